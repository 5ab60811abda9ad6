"""Files: atomic writes (a crash mid-write never leaves a truncated file behind), the
packaged config tree, and the offsets a results file samples bias profiles at."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        # mkstemp makes the file private (0600); give it the mode open() would.
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=True) + "\n")


def config_dir() -> str:
    """Absolute path of the packaged config tree (``relpos.configs``), falling back to
    the source checkout's top-level ``configs/``."""
    try:
        import relpos.configs as pkg  # installed or editable: configs/ mapped into the package

        return str(Path(pkg.__path__[0]).resolve())
    except ImportError:
        return str(Path(__file__).resolve().parent.parent / "configs")  # a source checkout


def profile_offsets(train_length: int, max_length: int, points: int = 256) -> np.ndarray:
    """The offsets at which results files sample a bias profile: every offset up to 2x
    the training length, then ``points`` log-spaced ones."""
    dense = np.arange(min(2 * train_length, max_length))
    tail = np.geomspace(max(len(dense), 1), max_length - 1, points) if max_length > len(dense) \
        else np.zeros(0)
    return np.unique(np.concatenate([dense, np.round(tail)]).astype(np.int64))
