"""Rotary position embeddings: RoPE and xPos.

* ``rope`` (Su et al., 2021, arXiv 2104.09864, RoFormer): rotate each pair of query
  and key channels by the angle ``t * theta_k``, ``theta_k = base^(-2k/d)``,
  k = 0 .. d/2 - 1, so that ``q_i . k_j`` depends on positions only through ``i - j``.
  Two pairings of channels are in use: ``layout="half"`` pairs channel k with
  ``k + d/2`` (GPT-NeoX, HF Llama), ``layout="interleaved"`` pairs ``2k`` with ``2k + 1``
  (the paper, Mesh-TF, torchscale). They differ by a fixed permutation of the head
  channels, which the learned q/k projections absorb.
  Two evaluation-time extrapolation tricks are options: position interpolation
  (Chen et al., 2023, arXiv 2306.15595) divides positions by ``interpolation``;
  NTK-aware scaling (bloc97, 2023) replaces ``base`` by
  ``base * ntk_factor^(d / (d - 2))``; YaRN (below) is the third, ``yarn_factor``.
* ``yarn`` (Peng et al., ICLR 2024, arXiv 2309.00071, "YaRN: Efficient Context Window
  Extension of Large Language Models"; official code jquesnelle/yarn,
  ``scaled_rope/LlamaYaRNScaledRotaryEmbedding.py``): RoPE whose frequencies are
  interpolated per dimension for a context ``s`` times the original length ``L``. With
  ``r_k = L / lambda_k`` rotations of dimension k over L (``lambda_k = 2 pi / theta_k``)
  and the ramp ``gamma_k = clamp((k - low) / (high - low), 0, 1)`` between the dimensions
  ``low``/``high`` that rotate ``beta = 32`` and ``alpha = 1`` times over L (floor and
  ceil, as the official ``_yarn_find_correction_range``): ``theta'_k = (1 - m_k)
  theta_k / s + m_k theta_k``, ``m_k = 1 - gamma_k``: fast dimensions are kept
  (extrapolated), slow ones interpolated. Queries and keys are also multiplied by
  ``sqrt(1/t) = 0.1 ln s + 1`` (the official scales its cos/sin caches by ``mscale``), so
  logits gain the temperature ``1/t = (0.1 ln s + 1)^2``. ``s = 1`` is plain RoPE, so a
  run trained with ``yarn`` (or ``rope``) is evaluated with YaRN by an override:
  ``relpos-eval run_dir=... +bias_overrides.factor=4`` for a ``yarn`` run, and
  ``+bias_overrides.name=yarn +bias_overrides.factor=4 +bias_overrides.original_length=L``
  for a ``rope`` run (``yarn`` accepts rope's options; rope's own options are unchanged,
  so rope runs keep their recorded ``bias_options``).
* ``xpos`` (Sun et al., ACL 2023, arXiv 2212.10554, "A Length-Extrapolatable
  Transformer"; torchscale ``XPOS``): RoPE whose rotated queries are also scaled by
  ``zeta_k^((i - c) / scale_base)`` and keys by ``zeta_k^(-(j - c) / scale_base)``,
  ``zeta_k = (2k + 0.4 d) / (1.4 d)``; so ``q_i . k_j`` gains the factor
  ``zeta_k^((i - j) / scale_base)``, a decay with distance. The centre ``c`` cancels
  in that product, so any centre gives the same attention; it exists because
  ``zeta^(t / scale_base)`` alone over- or underflows for long sequences (zeta_0 =
  2/7: at t = 65536 and scale_base 512 the factor is ~1e-70, past fp32). torchscale
  centres on the middle of the sequence; here ``c = (min + max) // 2`` of the key
  positions of each batch row, shared by q and k, which bounds the exponent by half
  the span of the window (or block) being attended. xPos is meant for causal
  attention.

Angles and scales are computed in fp32 and the results cast back to ``q.dtype``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from relpos.positions.base import (
    PositionScheme,
    RelposConfigError,
    check_choice,
    check_positive_float,
    check_positive_int,
    sinusoidal_frequencies,
)
from relpos.positions.registry import register

ROTARY_LAYOUTS = ("half", "interleaved")


def rope_frequencies(head_dim: int, base: float = 10000.0) -> tuple[float, ...]:
    """``theta_k = base^(-2k/d)`` for k = 0 .. d/2 - 1, as Python floats: the
    sinusoidal embedding's frequencies over the head dimension."""
    return sinusoidal_frequencies(head_dim, base)


def ntk_base(base: float, head_dim: int, factor: float) -> float:
    """NTK-aware base ``base * factor^(d / (d - 2))`` (``base`` itself when factor is 1)."""
    if factor == 1.0:
        return base
    return base * factor ** (head_dim / (head_dim - 2))


def yarn_mscale(factor: float) -> float:
    """``sqrt(1/t) = 0.1 ln s + 1`` for ``s > 1``, else 1 (official ``_yarn_get_mscale``)."""
    return 1.0 if factor <= 1.0 else 0.1 * math.log(factor) + 1.0


def yarn_frequencies(head_dim: int, base: float, factor: float, original_length: int,
                     alpha: float = 1.0, beta: float = 32.0) -> tuple[float, ...]:
    """YaRN's per-dimension frequencies ``theta'_k`` (see the module docstring), as
    Python floats; ``factor <= 1`` gives RoPE's own."""
    theta = rope_frequencies(head_dim, base)
    if factor <= 1.0:
        return theta

    def dim_of(rotations: float) -> float:  # the dimension k that rotates this often over L
        return (head_dim * math.log(original_length / (rotations * 2 * math.pi))
                / (2 * math.log(base)))

    low = max(math.floor(dim_of(beta)), 0)
    high = min(math.ceil(dim_of(alpha)), head_dim - 1)
    if low == high:
        high += 0.001  # as the official: no zero-width ramp
    out = []
    for k, t in enumerate(theta):
        keep = 1.0 - min(max((k - low) / (high - low), 0.0), 1.0)  # 1: extrapolate
        out.append(t / factor * (1.0 - keep) + t * keep)
    return tuple(out)


def rope_angles(positions: jax.Array, frequencies, interpolation: float = 1.0) -> jax.Array:
    """``[..., T, d/2]`` float32 angles ``(t / interpolation) * theta_k``."""
    pos = jnp.asarray(positions, jnp.float32) / interpolation
    return pos[..., None] * jnp.asarray(frequencies, jnp.float32)


def _pairs(x: jax.Array, layout: str) -> tuple[jax.Array, jax.Array]:
    half = x.shape[-1] // 2
    if layout == "half":
        return x[..., :half], x[..., half:]
    return x[..., 0::2], x[..., 1::2]


def _merge(a: jax.Array, b: jax.Array, layout: str) -> jax.Array:
    if layout == "half":
        return jnp.concatenate([a, b], axis=-1)
    return jnp.stack([a, b], axis=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])


def _per_token(x: jax.Array) -> jax.Array:
    """``[..., T, d/2]`` -> ``[..., T, 1, d/2]``: broadcast over the head axis of
    ``[B, T, H, d]`` (a leading batch axis of the positions lines up with B)."""
    return x[..., None, :]


def apply_rotary(x: jax.Array, angles: jax.Array, layout: str = "half",
                 scale: jax.Array | None = None) -> jax.Array:
    """Rotate channel pairs of ``x [B, T, H, d]`` by ``angles [..., T, d/2]``.

    ``scale [..., T, d/2]`` (xPos) multiplies both channels of each pair. Computed in
    fp32; returns ``x.dtype``.
    """
    x1, x2 = _pairs(x.astype(jnp.float32), layout)
    cos, sin = _per_token(jnp.cos(angles)), _per_token(jnp.sin(angles))
    if scale is not None:
        cos, sin = cos * _per_token(scale), sin * _per_token(scale)
    return _merge(x1 * cos - x2 * sin, x2 * cos + x1 * sin, layout).astype(x.dtype)


def rope(q: jax.Array, k: jax.Array, q_pos: jax.Array, k_pos: jax.Array, frequencies,
         layout: str = "half", interpolation: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """RoPE on ``q [B, Tq, H, d]`` and ``k [B, Tk, H, d]``; positions ``[T]`` or ``[B, T]``."""
    q = apply_rotary(q, rope_angles(q_pos, frequencies, interpolation), layout)
    k = apply_rotary(k, rope_angles(k_pos, frequencies, interpolation), layout)
    return q, k


def xpos_zeta(head_dim: int) -> tuple[float, ...]:
    """``zeta_k = (2k + 0.4 d) / (1.4 d)`` for k = 0 .. d/2 - 1."""
    return tuple((2 * k + 0.4 * head_dim) / (1.4 * head_dim) for k in range(head_dim // 2))


def xpos_centre(k_pos: jax.Array) -> jax.Array:
    """``(min + max) // 2`` of the key positions, ``[..., 1]`` (one per batch row)."""
    k_pos = jnp.asarray(k_pos, jnp.int32)
    return (jnp.min(k_pos, axis=-1, keepdims=True) + jnp.max(k_pos, axis=-1, keepdims=True)) // 2


def xpos_scale(positions: jax.Array, centre: jax.Array, zeta, scale_base: float) -> jax.Array:
    """``[..., T, d/2]`` float32 ``zeta_k^((t - c) / scale_base)``."""
    rel = (jnp.asarray(positions, jnp.int32) - centre).astype(jnp.float32) / scale_base
    return jnp.exp(rel[..., None] * jnp.log(jnp.asarray(zeta, jnp.float32)))


def xpos(q: jax.Array, k: jax.Array, q_pos: jax.Array, k_pos: jax.Array, frequencies, zeta,
         scale_base: float = 512.0, layout: str = "half") -> tuple[jax.Array, jax.Array]:
    """xPos on ``q [B, Tq, H, d]`` and ``k [B, Tk, H, d]``; positions ``[T]`` or ``[B, T]``."""
    centre = xpos_centre(k_pos)
    q_scale = xpos_scale(q_pos, centre, zeta, scale_base)
    k_scale = 1.0 / xpos_scale(k_pos, centre, zeta, scale_base)
    q = apply_rotary(q, rope_angles(q_pos, frequencies), layout, q_scale)
    k = apply_rotary(k, rope_angles(k_pos, frequencies), layout, k_scale)
    return q, k


def _check_head_dim(head_dim) -> int:
    head_dim = check_positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise RelposConfigError(f"rotary embeddings need an even head_dim, got {head_dim}")
    return head_dim


def _check_at_least_one(option: str, value) -> float:
    v = check_positive_float(option, value)
    if v < 1.0:
        raise RelposConfigError(f"{option} must be >= 1 (1 disables it), got {value!r}")
    return v


@register("rope")
class RoPE(PositionScheme):
    """Rotary embedding of queries and keys.

    Options:
      base: frequency base (10000).
      layout: ``"half"`` (GPT-NeoX) or ``"interleaved"`` (RoFormer).
      interpolation: position-interpolation factor >= 1 (positions are divided by it).
      ntk_factor: NTK-aware base scaling factor >= 1.
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs=None, base: float = 10000.0,
                 layout: str = "half", interpolation: float = 1.0, ntk_factor: float = 1.0):
        del num_heads, rngs
        self._setup(head_dim, base, layout, interpolation, ntk_factor)

    def _setup(self, head_dim, base, layout, interpolation, ntk_factor, yarn_factor=1.0,
               original_length=2048):
        head_dim = _check_head_dim(head_dim)
        base = check_positive_float("base", base)
        self.layout = check_choice("layout", layout, ROTARY_LAYOUTS)
        self.interpolation = _check_at_least_one("interpolation", interpolation)
        ntk_factor = _check_at_least_one("ntk_factor", ntk_factor)
        if ntk_factor != 1.0 and head_dim < 4:
            raise RelposConfigError(
                f"ntk_factor needs head_dim >= 4 (it uses d/(d-2)), got head_dim={head_dim}"
            )
        if yarn_factor != 1.0 and (ntk_factor != 1.0 or self.interpolation != 1.0):
            raise RelposConfigError(
                f"yarn factor={yarn_factor} replaces interpolation and ntk_factor: set those "
                f"to 1 (got interpolation={interpolation}, ntk_factor={ntk_factor})")
        self.frequencies = yarn_frequencies(head_dim, ntk_base(base, head_dim, ntk_factor),
                                            yarn_factor, original_length)
        self.mscale = yarn_mscale(yarn_factor)

    def rotate(self, q, k, q_pos, k_pos):
        q, k = rope(q, k, q_pos, k_pos, self.frequencies, self.layout, self.interpolation)
        if self.mscale != 1.0:  # YaRN's temperature, on q and k as the official cos/sin
            q, k = (x * jnp.asarray(self.mscale, x.dtype) for x in (q, k))
        return q, k


@register("yarn")
class YaRN(RoPE):
    """RoPE with YaRN's frequency ramp and temperature (see the module docstring).

    Options:
      factor: context extension factor ``s`` >= 1 (1: plain RoPE, e.g. for training).
      original_length: the original (training) context ``L``.
      base, layout, interpolation, ntk_factor: as for rope (accepted so that a rope run
        can be evaluated as ``yarn``; interpolation and ntk_factor must stay 1 when
        ``factor > 1``).
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs=None, factor: float = 1.0,
                 original_length: int = 2048, base: float = 10000.0, layout: str = "half",
                 interpolation: float = 1.0, ntk_factor: float = 1.0):
        del num_heads, rngs
        self._setup(head_dim, base, layout, interpolation, ntk_factor,
                    _check_at_least_one("factor", factor),
                    check_positive_int("original_length", original_length))


@register("xpos")
class XPos(PositionScheme):
    """RoPE with an exponential, direction-aware scale (see the module docstring).

    Options:
      base: frequency base (10000).
      scale_base: distance over which the decay ``zeta_k^(dist/scale_base)`` applies
        once (torchscale: 512).
      layout: ``"half"`` or ``"interleaved"`` (torchscale pairs interleaved channels).
    """

    def __init__(self, *, num_heads: int, head_dim: int, rngs=None, base: float = 10000.0,
                 scale_base: float = 512.0, layout: str = "half"):
        del num_heads, rngs
        head_dim = _check_head_dim(head_dim)
        self.frequencies = rope_frequencies(head_dim, check_positive_float("base", base))
        self.zeta = xpos_zeta(head_dim)
        self.scale_base = check_positive_float("scale_base", scale_base)
        self.layout = check_choice("layout", layout, ROTARY_LAYOUTS)

    def rotate(self, q, k, q_pos, k_pos):
        return xpos(q, k, q_pos, k_pos, self.frequencies, self.zeta, self.scale_base, self.layout)
