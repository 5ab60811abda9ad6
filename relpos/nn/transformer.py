"""Decoder-only pre-LayerNorm transformer LM whose position scheme is a swappable part.

The scheme's hooks are discovered by attribute: ``embed`` (added to token embeddings),
``rotate`` (applied to q and k in every layer), and the per-layer hooks of
:data:`relpos.positions.base.LAYER_HOOKS`: ``bias`` (additive attention-logit bias) and
the score hooks ``token_bias``, ``logit_scale``, ``modify_logits``, ``normalize``, each
called with the layer index. One scheme is shared by all layers by default (as in T5 and
KERPLE); ``share_position=False`` gives every layer its own module for any per-layer hook.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from relpos import positions
from relpos.errors import RelposConfigError, check_choice, check_positive_int
from relpos.layers import Linear, on_rows
from relpos.nn import flash
from relpos.nn.attention import (
    IMPLS,
    LayerScores,
    ScoreHooks,
    causal_attention,
    choose_impl,
    evaluate_bias,
)
from relpos.positions.base import LAYER_HOOKS, SCORE_HOOKS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and numerics of the LM. ``d_model = num_heads * head_dim``."""

    vocab_size: int = 257
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; parameters, bias and softmax stay fp32
    bias_inside_scale: bool = False  # True: (q.k + b)/sqrt(d) as in the seed formula
    share_position: bool = True  # one position module for all layers
    attn_impl: str = "auto"  # auto | dense | blockwise | cudnn | flash
    block_size: int = 512  # blockwise attention block (queries and keys)
    dense_max_len: int = 2048  # auto switches to blockwise beyond this length
    # > 0: every query attends only to keys at offsets < attention_window, whatever the
    # scheme (a sliding attention window; with eval.key_window, a control of whether a
    # model uses context beyond W); 0: the whole causal context
    attention_window: int = 0

    def validate(self) -> ModelConfig:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_ratio",
                     "block_size", "dense_max_len"):
            check_positive_int(f"model.{name}", getattr(self, name))
        check_positive_int("model.attention_window", self.attention_window, minimum=0)
        if self.d_model % self.num_heads:
            raise RelposConfigError(
                f"model.num_heads={self.num_heads} must divide model.d_model={self.d_model}"
            )
        check_choice("model.dtype", self.dtype, DTYPES)
        check_choice("model.attn_impl", self.attn_impl, IMPLS)
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def _has(obj, hook: str) -> bool:
    return callable(getattr(obj, hook, None))


def score_hooks(scheme, layer: int, x: jax.Array, positions: jax.Array) -> ScoreHooks | None:
    """The score hooks of ``scheme`` in layer ``layer`` (None if it has none), the layer
    bound and the token bias evaluated from the attention input ``x [B, T, D]``."""
    if not any(_has(scheme, h) for h in SCORE_HOOKS):
        return None
    bound = {h: functools.partial(getattr(scheme, h), layer=layer)
             for h in ("logit_scale", "modify_logits", "normalize") if _has(scheme, h)}
    c = None
    if _has(scheme, "token_bias"):
        c = scheme.token_bias(x, positions, layer=layer).astype(jnp.float32)  # [B, T, H]
    return ScoreHooks(token_bias=c, owner=getattr(scheme, "name", "") or type(scheme).__name__,
                      **bound)


class Block(nnx.Module):
    """Pre-LN block: x + Attn(LN(x)); x + MLP(LN(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt = DTYPES[cfg.dtype]
        d, h = cfg.d_model, cfg.num_heads
        self.num_heads, self.head_dim = h, cfg.head_dim
        self.ln1 = nnx.LayerNorm(d, dtype=dt, rngs=rngs)
        self.qkv = Linear(d, 3 * d, use_bias=False, dtype=dt, rngs=rngs)
        # GPT-2: residual projections scaled by 1/sqrt(2 * layers)
        resid_init = nnx.initializers.normal(0.02 / (2 * cfg.num_layers) ** 0.5)
        self.out = Linear(d, d, use_bias=False, dtype=dt, rngs=rngs, kernel_init=resid_init)
        self.ln2 = nnx.LayerNorm(d, dtype=dt, rngs=rngs)
        self.fc1 = Linear(d, cfg.mlp_ratio * d, dtype=dt, rngs=rngs)
        self.fc2 = Linear(cfg.mlp_ratio * d, d, dtype=dt, rngs=rngs, kernel_init=resid_init)

    def __call__(self, x, *, positions, bias, rotate, attn_kw, observe=None, scheme=None,
                 layer: int = 0):
        b, t, _ = x.shape
        h = self.ln1(x)
        # jnp.split (backward: one concatenate) rather than indexing a [B, T, 3, H, d]
        # reshape (backward: three zero-padded copies summed): 0.92x step time for `none`.
        q, k, v = (z.reshape(b, t, self.num_heads, self.head_dim)  # [B, T, H, d]
                   for z in jnp.split(self.qkv(h), 3, axis=-1))
        if rotate is not None:
            q, k = rotate(q, k, positions, positions)
        hooks = None if scheme is None else score_hooks(scheme, layer, h, positions)
        if observe is not None:  # diagnostics: see what this layer's attention sees
            observe(q=q, k=k, bias=bias if hooks is None else LayerScores(bias, hooks),
                    positions=positions, bias_inside_scale=attn_kw["bias_inside_scale"],
                    window=attn_kw["window"])
        a = causal_attention(q, k, v, q_pos=positions, k_pos=positions, bias=bias,
                             hooks=hooks, **attn_kw)
        x = x + self.out(a.reshape(b, t, -1))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


class TransformerLM(nnx.Module):
    """Decoder-only LM. ``__call__(tokens [B, T], positions [T] | [B, T]) -> logits``."""

    def __init__(self, cfg: ModelConfig, position: str = "none",
                 position_options: dict[str, Any] | None = None, *, rngs: nnx.Rngs):
        self.cfg = cfg.validate()
        opts = dict(position_options or {})
        build = lambda: positions.build(position, num_heads=cfg.num_heads,
                                        head_dim=cfg.head_dim, rngs=rngs, **opts)
        self.position = build()
        self.position_name = position
        per_layer = any(_has(self.position, hook) for hook in LAYER_HOOKS)
        # Per-layer copies only make sense for per-layer hooks (a bias, a score hook);
        # embeddings and rotations act once.
        self.layer_positions = nnx.List(
            [build() for _ in range(cfg.num_layers - 1)] if per_layer and not cfg.share_position
            else []
        )
        dt = DTYPES[cfg.dtype]
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, rngs=rngs,
                               embedding_init=nnx.initializers.normal(0.02))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.ln_f = nnx.LayerNorm(cfg.d_model, dtype=dt, rngs=rngs)
        self.head = None if cfg.tie_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dt, rngs=rngs)
        if cfg.attn_impl == "flash":
            self._check_flash()

    def _layer_scheme(self, i: int):
        if i == 0 or not len(self.layer_positions):
            return self.position
        return self.layer_positions[i - 1]

    def hidden(self, tokens: jax.Array, positions: jax.Array | None = None, *,
               impl: str | None = None, observe=None) -> jax.Array:
        """Final-norm hidden states ``[B, T, D]`` (the LM head is applied separately so
        that long evaluation can compute the loss in chunks). ``observe(layer, q=, k=,
        bias=, positions=, bias_inside_scale=)``, if given, is called in every layer with
        its (rotated) queries and keys and its bias, before attention (diagnostics); for a
        scheme with score hooks ``bias`` is a :class:`relpos.nn.attention.LayerScores`,
        which :func:`relpos.nn.attention.attention_weights` evaluates with the hooks."""
        cfg = self.cfg
        t = tokens.shape[1]
        if positions is None:
            positions = jnp.arange(t, dtype=jnp.int32)
        positions = jnp.asarray(positions, jnp.int32)
        x = self.embed(tokens)
        if _has(self.position, "embed"):
            x = x + self.position.embed(positions).astype(x.dtype)
        rotate = self.position.rotate if _has(self.position, "rotate") else None
        impl = self.attention_impl(t, batched=positions.ndim == 2, impl=impl)
        if impl == "flash":
            self._check_flash()
        attn_kw = dict(bias_inside_scale=cfg.bias_inside_scale, impl=impl,
                       block_size=cfg.block_size, dense_max_len=cfg.dense_max_len,
                       window=cfg.attention_window)
        shared_bias = None
        for i, block in enumerate(self.blocks):
            scheme = self._layer_scheme(i)
            bias = scheme.bias if _has(scheme, "bias") else None
            if bias is not None and impl == "flash":  # evaluated per tile in the kernel
                bias = flash.kernel_bias(scheme, cfg.num_heads, (positions, positions))
            elif bias is not None and impl != "blockwise":
                # Dense paths: evaluate a shared bias once for all layers.
                if shared_bias is None or len(self.layer_positions):
                    shared_bias = evaluate_bias(bias, positions, positions)
                bias = shared_bias
            x = block(x, positions=positions, bias=bias, rotate=rotate, attn_kw=attn_kw,
                      observe=None if observe is None else functools.partial(observe, i),
                      scheme=scheme, layer=i)
        return self.ln_f(x)

    def attention_impl(self, length: int, *, batched: bool = False,
                       impl: str | None = None) -> str:
        """The attention path a forward pass over ``length`` tokens takes (``auto``
        resolved); ``batched``: positions per example ([B, T]) rather than shared."""
        cfg = self.cfg
        # an attention window is a mask cuDNN is not given: the paths with score hooks
        return choose_impl(impl or cfg.attn_impl, length=length, dtype=DTYPES[cfg.dtype],
                           dense_max_len=cfg.dense_max_len, learned_bias=self._learned_bias(),
                           batched_bias=batched, head_dim=cfg.head_dim,
                           score_hooks=bool(cfg.attention_window) or any(
                               _has(self.position, h) for h in SCORE_HOOKS))

    def _check_flash(self) -> None:
        """Refuse, in one line, a scheme the flash kernel cannot evaluate."""
        reason = flash.unsupported(self.position)
        if reason:
            raise RelposConfigError(f"{self.position_name}: {reason}")

    def _learned_bias(self) -> bool:
        scheme = self.position
        return (_has(scheme, "bias") and isinstance(scheme, nnx.Module)
                and bool(jax.tree.leaves(nnx.state(scheme, nnx.Param))))

    def logits(self, h: jax.Array) -> jax.Array:
        """LM head in fp32: ``[..., D] -> [..., V]``."""
        head = self.embed.attend if self.head is None else self.head
        return on_rows(head, h).astype(jnp.float32)  # rows: see Linear

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None, *,
                 impl: str | None = None) -> jax.Array:
        return self.logits(self.hidden(tokens, positions, impl=impl))


def count_params(model: nnx.Module) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
