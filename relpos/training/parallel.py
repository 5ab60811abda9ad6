"""Data-parallel (and optionally FSDP) training with ``jax.sharding``.

The training step is :func:`relpos.training.step.make_train_step` unchanged: ``jax.jit``
partitions it from the shardings of its inputs (GSPMD). This module only builds a 1-D
device mesh with axis ``"data"``, places the state and batches, and re-jits the step
with explicit output shardings so that the state keeps its layout from step to step
(no re-compile after the first step, no silent gathering onto one device).

* data parallel: the batch is split along its batch axis (``PartitionSpec("data")``),
  parameters and optimiser state are replicated; the gradient all-reduce is inserted by
  XLA where the replicated parameters meet the sharded loss.
* FSDP (``fsdp=True``, ZeRO-3 style): each parameter and its optimiser moments are
  additionally split along their largest axis divisible by the device count (small or
  indivisible arrays stay replicated); XLA all-gathers them for the forward/backward.

Simulate devices on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``
(set before JAX initialises), as the tests do.

Example::

    mesh = data_mesh()
    step = make_parallel_train_step(graphdef, tx, mesh, params, opt_state, fsdp=False)
    params, opt_state, guard = place_state(mesh, (params, opt_state, guard))
    tokens, positions = place_batch(mesh, tokens, positions)
    params, opt_state, guard, metrics = step(params, opt_state, guard, tokens, positions,
                                             jnp.int32(0))
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from relpos.errors import RelposError
from relpos.training.step import fresh_guard, pure_step

AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all of them)."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Split the batch axis over ``"data"`` (axis 0; axis 1 of a ``stacked`` ``[n, B, ...]``
    array of ``n`` steps' batches); other axes whole."""
    return NamedSharding(mesh, P(None, AXIS) if stacked else P(AXIS))


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Shard the largest axis divisible by ``n``; replicate if none is (or for scalars)."""
    axes = [a for a in range(len(shape)) if shape[a] % n == 0 and shape[a] >= n]
    if n == 1 or not axes:
        return P()
    axis = max(axes, key=lambda a: shape[a])
    return P(*([None] * axis + [AXIS]))


def state_shardings(mesh: Mesh, tree, *, fsdp: bool = False):
    """A pytree of shardings matching ``tree`` (params, optimiser state, guard...)."""
    n = mesh.shape[AXIS]

    def one(x):
        if not fsdp or not hasattr(x, "shape"):
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_spec(tuple(x.shape), n))

    return jax.tree.map(one, tree)


def put(tree, sharding):
    """A pytree of arrays (every process holding the same values) on the mesh with
    ``sharding`` (one, or a matching pytree): ``device_put`` in one process; across
    processes each process supplies its own devices' parts from its copy
    (``jax.make_array_from_callback``), since no process addresses every device."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    if isinstance(sharding, jax.sharding.Sharding):
        sharding = jax.tree.map(lambda _: sharding, tree)

    def one(x, sh):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    return jax.tree.map(one, tree, sharding)


def place_state(mesh: Mesh, tree, *, fsdp: bool = False):
    """Put a state pytree on the mesh: replicated, or FSDP-sharded with ``fsdp``."""
    return put(tree, state_shardings(mesh, tree, fsdp=fsdp))


def check_batch(mesh: Mesh, batch_size: int) -> None:
    n = mesh.shape[AXIS]
    if batch_size % n:
        raise RelposError(f"batch size {batch_size} is not divisible by the {n} devices of "
                          f"the data mesh; choose a multiple of {n}")


def positions_sharding(mesh: Mesh, batched: bool, stacked: bool = False) -> NamedSharding:
    """Shared positions ``[T]`` are replicated; per-example positions ``[B, T]``
    (``batched``; ``[n, B, T]`` if ``stacked``) follow the batch."""
    return batch_sharding(mesh, stacked) if batched else replicated(mesh)


def place_batch(mesh: Mesh, tokens, positions, *, stacked: bool = False):
    """Split ``tokens [B, T+1]`` (and ``[B, T]`` positions) along the batch axis; with
    ``stacked``, ``[n, B, T+1]`` tokens (and ``[n, B, T]`` positions) of ``n`` steps."""
    check_batch(mesh, tokens.shape[1 if stacked else 0])
    batched = np.ndim(positions) == (3 if stacked else 2)
    return (put(tokens, batch_sharding(mesh, stacked)),
            put(positions, positions_sharding(mesh, batched, stacked)))


def make_parallel_train_step(graphdef, tx, mesh: Mesh, params, opt_state, *,
                             fsdp: bool = False, batched_positions: bool = False,
                             multi: bool = False, sample_length: int | None = None):
    """:func:`relpos.training.step.make_train_step` (``multi``: several steps per call;
    ``sample_length``: window starts and the replicated corpus instead of tokens) with
    the mesh layout pinned on its inputs and outputs. ``params`` and ``opt_state``
    (arrays or abstract shapes) give the tree structure; the returned function has the
    step's signature and donates the state."""
    step = pure_step(graphdef, tx, multi=multi, sample_length=sample_length)
    rep = replicated(mesh)
    p_sh = state_shardings(mesh, params, fsdp=fsdp)
    o_sh = state_shardings(mesh, opt_state, fsdp=fsdp)
    g_sh = jax.tree.map(lambda _: rep, fresh_guard())
    pos_sh = positions_sharding(mesh, batched_positions, multi)
    corpus = () if sample_length is None else (rep,)
    return jax.jit(step, in_shardings=(p_sh, o_sh, g_sh, batch_sharding(mesh, multi), pos_sh,
                                       rep, *corpus),
                   out_shardings=(p_sh, o_sh, g_sh, rep), donate_argnums=(0, 1, 2))
