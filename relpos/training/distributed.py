"""Several processes training one model (``train.distributed=true``): start-up, and what
differs from one process.

* :func:`initialize` calls ``jax.distributed.initialize`` with the coordinator, process
  count and process id from ``train.coordinator`` / ``train.num_processes`` /
  ``train.process_id`` where set, else from the environment: JAX reads SLURM's variables
  under ``srun`` (``SLURM_PROCID``, ``SLURM_NTASKS``, the first node of
  ``SLURM_STEP_NODELIST``) and ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID``. On CPU the processes' collectives go through gloo.
* The mesh spans every process's devices (:func:`relpos.training.parallel.data_mesh`);
  each process puts only its own devices' part of a batch or of the state
  (:func:`relpos.training.parallel.put`), all processes computing the same global batch
  from (seed, step).
* Process 0 alone writes the run's files (results, metrics, TensorBoard, the saved
  config); checkpoints are written by orbax across the processes, each array once.
* Evaluation runs on each process's first device from a local copy of the parameters
  (:func:`to_local`), so every process computes the single-process results.
"""

from __future__ import annotations

import hashlib
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from relpos.errors import RelposError

_SETTINGS = (("coordinator", "coordinator_address"), ("num_processes", "num_processes"),
             ("process_id", "process_id"))


def initialize(t) -> None:
    """``jax.distributed.initialize`` from ``train.*`` or the environment (module doc);
    before any JAX computation. A missing or unreachable coordinator is one error."""
    kwargs = {arg: getattr(t, key) for key, arg in _SETTINGS if getattr(t, key) is not None}
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - JAX's errors here are ValueError/RuntimeError
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RelposError(
            f"train.distributed=true could not start ({first}); run one process per task "
            "under srun, or set train.coordinator=<host:port> train.num_processes=<n> "
            "train.process_id=<i> (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
            "JAX_PROCESS_ID)") from None


def is_primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def process_index_hint(argv: list[str], environ=os.environ) -> int:
    """This process's index before JAX starts (for the command line to keep Hydra's files
    to process 0): ``train.process_id=<i>`` on the command line, else
    ``JAX_PROCESS_ID``, else SLURM's ``SLURM_PROCID``; 0 if none is set or if
    ``train.distributed=true`` is not on the command line."""
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if args.get("train.distributed", "").lower() != "true":
        return 0
    for value in (args.get("train.process_id"), environ.get("JAX_PROCESS_ID"),
                  environ.get("SLURM_PROCID")):
        if value not in (None, "", "null"):
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def to_local(tree):
    """The pytree's arrays whole on this process's first device (for evaluation): a
    replicated array's own copy, an array split across processes gathered (a collective:
    every process calls it at the same point). One process: unchanged."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    device = jax.local_devices()[0]

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_replicated:
            value = x.addressable_data(0)
        else:
            value = multihost_utils.process_allgather(x, tiled=True)
        return jax.device_put(value, device)

    return jax.tree.map(one, tree)


def stop_agreement(mesh: Mesh):
    """``agree(signum) -> device scalar``: the largest ``signum`` (0: none) of all
    processes, for the trainer to stop every process after the same step when a signal
    reaches only some of them, or reaches them between different calls."""
    axis = mesh.axis_names[0]
    sharding = NamedSharding(mesh, P(axis))
    local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    reduce = jax.jit(lambda x: x.max(), out_shardings=NamedSharding(mesh, P()))

    def agree(signum: int):
        x = jax.make_array_from_process_local_data(
            sharding, np.full((local,), signum, np.int32), (mesh.size,))
        return reduce(x)

    return agree


def check_same(value: str, what: str) -> None:
    """Raise on every process if ``value`` is not the same on all of them."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = int.from_bytes(hashlib.sha256(value.encode()).digest()[:4], "little") >> 1
    every = np.asarray(multihost_utils.process_allgather(np.int32(digest)))
    if (every != every.reshape(-1)[0]).any():
        raise RelposError(f"the {jax.process_count()} processes were given different {what} "
                          f"(this one: {value}); give every process the same, e.g. "
                          "hydra.run.dir=<one shared directory>")


def barrier(name: str) -> None:
    """Every process waits here for the others (no-op in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
