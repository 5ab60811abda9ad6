"""Orbax checkpoints of the training state ``{params, opt_state, guard}`` + JSON metadata.

* Every save is read back before training goes on: a checkpoint that cannot be restored
  fails the run at the step that wrote it, never at the next resume.
* Arrays are stored one zarr folder each, not in orbax's OCDBT database: orbax merges
  OCDBT files with a glob over the checkpoint's path, which finds nothing when the path
  holds ``[`` (as Hydra's multirun job folders do, e.g. ``eval.multiples=[1,2]``), and
  the checkpoint silently becomes unreadable. Checkpoints written with OCDBT by earlier
  versions are still read.
* Orbax writes each step to a temporary folder and renames it when complete, so a crash
  mid-save leaves the previous step intact; :meth:`Checkpoints.restore_latest` falls back
  to older steps when the newest cannot be read.
* :meth:`Checkpoints.restore_params` restores the parameters alone, so evaluation never
  builds an optimiser.
* Several processes (``train.distributed=true``) save and restore together: orbax
  writes each array once (each shard by the process holding its first replica, the
  metadata by process 0), and a checkpoint restores in whatever layout the restoring
  run asks for (``abstract_state``'s shardings), so it resumes on any process count.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from relpos.errors import RelposError

log = logging.getLogger(__name__)


class Checkpoints:
    """A CheckpointManager over ``directory`` keeping the newest ``keep`` steps."""

    def __init__(self, directory: Path, keep: int):
        self.mgr = ocp.CheckpointManager(
            Path(directory).resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=False),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    @property
    def directory(self) -> Path:
        return Path(self.mgr.directory)

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Save ``state`` at ``step`` and read it back; raise if it does not read back
        equal (the run stops with the checkpoint's path, its older steps intact)."""
        self.mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.mgr.wait_until_finished()
        try:
            back = self._restore(step, state)["state"]
        except Exception as e:  # noqa: BLE001 - any failure to read back is the error
            raise RelposError(
                f"checkpoint {step} in {self.directory} was written but cannot be read back "
                f"({type(e).__name__}: {_first_line(e)}); training stopped") from e
        bad = [jax.tree_util.keystr(k) for k, a, b in _pairs(state, back) if not _equal(a, b)]
        if bad:
            raise RelposError(f"checkpoint {step} in {self.directory} reads back different "
                              f"values ({', '.join(bad[:3])}); training stopped")

    def _restore(self, step: int, abstract_state: dict, *, partial: bool = False):
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
        return self.mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=partial),
            meta=ocp.args.JsonRestore()))

    def restore_latest(self, abstract_state: dict, *, set_aside: bool = False,
                       partial: bool = False) -> tuple[int, dict, dict] | None:
        """The newest readable step as ``(step, state, meta)``, or None if there is none.

        ``set_aside``: rename unreadable newer steps to ``<step>.unreadable`` (kept for
        inspection), since training will save those step numbers again. ``partial``:
        ``abstract_state`` names a subset of the saved items (e.g. the parameters).
        """
        errors, bad_steps = [], []
        for step in sorted(self.mgr.all_steps(), reverse=True):
            try:
                out = self._restore(step, abstract_state, partial=partial)
            except Exception as e:  # noqa: BLE001 - corrupt or partial step: try an older one
                errors.append(f"{step} ({type(e).__name__}: {_first_line(e)})")
                bad_steps.append(step)
                continue
            if errors:
                log.warning("checkpoint(s) %s unreadable; using step %d", "; ".join(errors), step)
                if set_aside:
                    self._set_aside(bad_steps)
            return step, out["state"], out["meta"]
        if errors:
            raise RelposError(
                f"no readable checkpoint in {self.directory}: tried steps {', '.join(errors)}. "
                "The folders are left as they are; run with RELPOS_TRACEBACK=1 for the full "
                "error, or use a new hydra.run.dir to train afresh")
        return None

    def restore_params(self, abstract_params) -> tuple[int, object] | None:
        """``(step, params)`` of the newest readable step, without the optimiser state."""
        out = self.restore_latest({"params": abstract_params}, partial=True)
        return None if out is None else (out[0], out[1]["params"])

    def _set_aside(self, steps) -> None:
        root = self.directory
        if jax.process_index() != 0:  # process 0 renames; the others wait for it
            _barrier("relpos: checkpoints set aside")
            self.mgr.reload()
            return
        for step in steps:
            target = root / f"{step}.unreadable"
            n = 1
            while target.exists():
                target, n = root / f"{step}.unreadable{n}", n + 1
            (root / str(step)).rename(target)
            log.warning("moved unreadable checkpoint %s aside to %s", step, target)
        _barrier("relpos: checkpoints set aside")
        self.mgr.reload()

    def close(self):
        self.mgr.close()


def has_checkpoint(directory: Path) -> bool:
    """Whether ``directory`` holds at least one saved step."""
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def _equal(a, b) -> bool:
    """Array equality; for an array split across processes, of this process's shards."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        key = lambda shard: shard.device.id  # noqa: E731
        return all(np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in
                   zip(sorted(a.addressable_shards, key=key),
                       sorted(b.addressable_shards, key=key)))
    return np.array_equal(np.asarray(a), np.asarray(b))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [""])[0][:160]


def _pairs(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    return [(k, x, y) for (k, x), y in zip(flat_a, flat_b)]
