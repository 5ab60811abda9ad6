"""The decoder LM, importable as ``relpos.model`` (stable name; defined in :mod:`relpos.nn`)."""

from relpos.nn.transformer import DTYPES, Block, ModelConfig, TransformerLM, count_params

__all__ = ["DTYPES", "Block", "ModelConfig", "TransformerLM", "count_params"]
