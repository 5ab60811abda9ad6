import os

import pytest

# Tests never touch the network: hub look-ups fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# fp32 oracles: on GPUs JAX's default fp32 matmul uses TF32 (~3 decimal digits).
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# After the environment above: helpers imports JAX, which reads it at import.
from helpers import Workspace  # noqa: E402


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """A workspace (corpus, token cache, tiny-run overrides) shared by a test module."""
    return Workspace(tmp_path_factory.mktemp("ws"), tmp_path_factory.getbasetemp())
