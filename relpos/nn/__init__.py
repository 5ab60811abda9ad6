"""Neural-network parts: causal attention (dense, blockwise, cuDNN) and the decoder LM."""

from relpos.nn.attention import IMPLS, causal_attention, choose_impl
from relpos.nn.transformer import DTYPES, Block, ModelConfig, TransformerLM, count_params

__all__ = ["IMPLS", "DTYPES", "Block", "ModelConfig", "TransformerLM", "causal_attention",
           "choose_impl", "count_params"]
