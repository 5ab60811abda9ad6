import os
import shutil
import tempfile

import pytest

# Tests never touch the network: hub look-ups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# fp32 oracles: on GPUs JAX's default fp32 matmul uses TF32 (~3 decimal digits).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# One persistent compilation cache for the session (a fresh folder, removed at the end):
# many tests compile the same small programs (the same model and step for another test),
# and a cache hit skips XLA's compile. Measured: tests/test_model.py 304 s -> 237 s.
_JAX_CACHE = tempfile.mkdtemp(prefix="relpos-tests-jax-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# After the environment above: helpers imports JAX, which reads it at import.
from helpers import Workspace  # noqa: E402


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """A workspace (corpus, token cache, tiny-run overrides) shared by a test module."""
    return Workspace(tmp_path_factory.mktemp("ws"), tmp_path_factory.getbasetemp())


def pytest_unconfigure(config):
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)
