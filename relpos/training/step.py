"""The training step: AdamW (optax) and a pure, jit-compiled update with a non-finite guard.

State between steps is a pure pytree ``(params, opt_state, guard)``; the model's graph
definition is closed over by the step function (NNX split/merge style), so no Python
graph walk happens per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from relpos.positions import PositionTable


def decay_mask(params, decay_tables: bool):
    """Weight decay on matrices only (not norms, biases, scalars), and on position
    tables only when asked (see OptimSection.decay_position_tables)."""

    def want(v):
        if isinstance(v, PositionTable):
            return decay_tables
        return v.value.ndim >= 2

    return jax.tree.map(want, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def position_mask(params):
    """True for the position scheme's parameters (the model's ``position`` and
    ``layer_positions`` modules), False for the rest."""
    def owner(path, _):
        return getattr(path[0], "key", None) in ("position", "layer_positions")

    return jax.tree_util.tree_map_with_path(owner, params)


def make_optimizer(ocfg, steps: int, params) -> tuple[optax.GradientTransformation, Any]:
    warmup = min(ocfg.warmup_steps, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=ocfg.lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=ocfg.lr * ocfg.min_lr_ratio)
    parts = [
        optax.clip_by_global_norm(ocfg.clip_norm),
        optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                    weight_decay=ocfg.weight_decay,
                    mask=decay_mask(params, ocfg.decay_position_tables)),
    ]
    scale = ocfg.position_lr_scale
    if scale != 1.0:  # Adam's update is ~lr per step: scaling it scales the lr
        parts.append(optax.masked(optax.scale(scale), position_mask(params)))
    return optax.chain(*parts), schedule


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class WeightedTokens:
    """A task batch: ``tokens [..., B, T+1]`` and per-target loss ``weights [..., B, T]``
    (1 on answer tokens; :mod:`relpos.tasks`), and ``inputs [..., B, T]`` when the model
    reads something other than ``tokens[..., :-1]`` (a task without teacher forcing;
    None otherwise). It stands where a token array goes (the trainer, the multi-step scan
    and the data-parallel placement read ``shape`` and ``ndim``, which are the tokens')."""

    tokens: Any
    weights: Any
    inputs: Any = None

    @property
    def shape(self):
        return self.tokens.shape

    @property
    def ndim(self):
        return self.tokens.ndim


def lm_loss(model, tokens, positions):
    """Mean next-token NLL over ``tokens[:, :-1] -> tokens[:, 1:]``; for
    :class:`WeightedTokens`, the weighted mean (the mean over answer tokens)."""
    if isinstance(tokens, WeightedTokens):
        inputs = tokens.tokens[:, :-1] if tokens.inputs is None else tokens.inputs
        nll = optax.softmax_cross_entropy_with_integer_labels(
            model(inputs, positions), tokens.tokens[:, 1:])
        return (nll * tokens.weights).sum() / jnp.maximum(tokens.weights.sum(), 1.0)
    logits = model(tokens[:, :-1], positions)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def train_step_fn(graphdef, tx):
    """Pure step ``(params, opt_state, guard, tokens, positions, step) -> (..., metrics)``.

    A non-finite loss or gradient norm never reaches the parameters: the update is
    dropped and ``guard`` records the first such step and which metric it was
    (1: loss, 2: grad_norm), plus how many steps were skipped.
    """

    def step_fn(params, opt_state, guard, tokens, positions, step):
        loss, grads = jax.value_and_grad(
            lambda p: lm_loss(nnx.merge(graphdef, p), tokens, positions))(params)
        gnorm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_params, new_opt = keep(new_params, params), keep(new_opt, opt_state)
        what = jnp.where(jnp.isfinite(loss), 2, 1)
        first = guard["bad_step"] < 0
        guard = {
            "bad_step": jnp.where(~ok & first, step, guard["bad_step"]),
            "bad_what": jnp.where(~ok & first, what, guard["bad_what"]),
            "skipped": guard["skipped"] + (~ok).astype(jnp.int32),
        }
        # the guard's counters ride along with the metrics: a log row reads them from the
        # (undonated) metrics while the next call already owns the donated state
        return new_params, new_opt, guard, {"loss": loss, "grad_norm": gnorm, **guard}

    return step_fn


def multi_step_fn(graphdef, tx):
    """``n`` consecutive steps in one call: ``tokens [n, B, T+1]``, ``positions`` shared
    ``[T]`` or per step ``[n, B, T]``, first step index ``step``; the metrics come back
    stacked ``[n]``. Same result as ``n`` calls of :func:`train_step_fn` (a ``lax.scan``
    over it); on CPU it saves XLA's per-call allocation of its temp buffer, whose fresh
    pages the kernel must fault in and zero on every call under glibc malloc."""
    step_fn = train_step_fn(graphdef, tx)

    def multi(params, opt_state, guard, tokens, positions, step):
        per_step_pos = positions.ndim == tokens.ndim

        def body(carry, xs):
            tok, pos, i = xs
            *carry, m = step_fn(*carry, tok, positions if pos is None else pos, step + i)
            return tuple(carry), m

        steps = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        xs = (tokens, positions if per_step_pos else None, steps)
        carry, metrics = jax.lax.scan(body, (params, opt_state, guard), xs)
        return (*carry, metrics)

    return multi


def gather_windows(corpus, starts, length: int):
    """The training windows ``corpus[s : s + length + 1]`` for every start ``s`` of
    ``starts`` (any leading shape: ``[B]``, or ``[n, B]`` for n steps), as int32: what
    :func:`relpos.data.train_batch` gathers on the host, gathered on the device."""
    idx = starts[..., None] + jnp.arange(length + 1, dtype=starts.dtype)
    return corpus.at[idx].get(mode="promise_in_bounds").astype(jnp.int32)


def sampling_step(step_fn, length: int):
    """``step_fn`` fed from a token array on the device: ``(params, opt_state, guard,
    starts, positions, step, corpus)``, the windows gathered from ``corpus`` at
    ``starts`` inside the compiled call (:func:`gather_windows`), so a call takes only
    ``B`` integers per step from the host."""

    def fn(params, opt_state, guard, starts, positions, step, corpus):
        return step_fn(params, opt_state, guard, gather_windows(corpus, starts, length),
                       positions, step)

    return fn


def pure_step(graphdef, tx, *, multi: bool = False, sample_length: int | None = None):
    """:func:`train_step_fn`, or with ``multi`` :func:`multi_step_fn` (not yet jitted);
    with ``sample_length`` (the training length) it takes window starts and the
    corpus instead of tokens (:func:`sampling_step`)."""
    fn = (multi_step_fn if multi else train_step_fn)(graphdef, tx)
    return fn if sample_length is None else sampling_step(fn, sample_length)


def make_train_step(graphdef, tx, *, multi: bool = False, sample_length: int | None = None):
    """The jitted :func:`pure_step`; the state (params, optimiser state, guard) is
    donated."""
    return jax.jit(pure_step(graphdef, tx, multi=multi, sample_length=sample_length),
                   donate_argnums=(0, 1, 2))


def fresh_guard():
    return {"bad_step": jnp.int32(-1), "bad_what": jnp.int32(0), "skipped": jnp.int32(0)}


def last_metric(x) -> float:
    """The last value of a metric: a scalar, or ``[n]`` from an n-step call."""
    return float(np.asarray(x).reshape(-1)[-1])
