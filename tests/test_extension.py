"""A bias function from the user's own package, selected without editing relpos."""

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import builtin_schemes, tiny_args, write_corpus

import relpos.positions as P
from relpos.model import ModelConfig, TransformerLM
from relpos.positions import registry

# The README's example, verbatim in spirit: a class with bias(q_pos, k_pos).
PLUGIN = textwrap.dedent('''
    import jax.numpy as jnp
    from flax import nnx
    import relpos.positions as P

    @P.register("gauss_test")
    class GaussianBias(P.PositionScheme):
        """b_h(i, j) = -w_h (i - j)^2 / width^2."""

        def __init__(self, *, num_heads, head_dim, rngs: nnx.Rngs, width: float = 64.0):
            self.width = width
            self.w = nnx.Param(jnp.ones((num_heads,)))

        def bias(self, q_pos, k_pos):
            d = jnp.maximum(q_pos[:, None] - k_pos[None, :], 0).astype(jnp.float32)
            return -self.w[...][:, None, None] * (d / self.width) ** 2


    class DuckBias:
        """No relpos base class, no rngs: duck typing is enough."""

        def __init__(self, num_heads, slope=0.5):
            self.num_heads, self.slope = num_heads, slope

        def bias(self, q_pos, k_pos):
            d = jnp.maximum(q_pos[:, None] - k_pos[None, :], 0).astype(jnp.float32)
            return jnp.broadcast_to(-self.slope * d, (self.num_heads,) + d.shape)
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    # The plug-in registers a name; keep the registry as other tests expect it.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.delitem(sys.modules, "my_bias_pkg.biases", raising=False)
    monkeypatch.delitem(sys.modules, "my_bias_pkg", raising=False)
    pkg = tmp_path / "my_bias_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "biases.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


def test_import_path_builds_and_runs_in_model(plugin):
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4)
    model = TransformerLM(cfg, "my_bias_pkg.biases:GaussianBias", {"width": 8.0},
                          rngs=nnx.Rngs(0))
    tokens = jnp.arange(40).reshape(1, 40) % 50
    dense = model(tokens, impl="dense")
    block = model(tokens, impl="blockwise")
    assert dense.shape == (1, 40, 50) and np.isfinite(np.asarray(dense)).all()
    np.testing.assert_allclose(block, dense, rtol=1e-5, atol=1e-5)
    # The bias really is the user's formula.
    b = model.position.bias(jnp.arange(5), jnp.arange(5))
    i, j = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    np.testing.assert_allclose(b[0], -(np.maximum(i - j, 0) / 8.0) ** 2, rtol=1e-6)
    # Registered by the decorator once imported; unknown options are refused by name.
    assert "gauss_test" in P.available()
    with pytest.raises(ValueError, match="'widht' is not an option.*valid options: width"):
        P.build("gauss_test", num_heads=2, head_dim=4, widht=3)


def test_duck_typed_class_without_rngs(plugin):
    s = P.build("my_bias_pkg.biases.DuckBias", num_heads=3, head_dim=4, slope=0.25)
    b = s.bias(jnp.arange(4), jnp.arange(4))
    assert b.shape == (3, 4, 4) and b.dtype == jnp.float32
    np.testing.assert_allclose(b[2, 3, 0], -0.75)


def test_entry_point_plugin_is_available_but_not_built_in(plugin, monkeypatch):
    """What installing a package with a ``relpos.positions`` entry point does: its name
    is listed by available() and builds; builtin_schemes() (which test_positions.py's
    exact list is compared with) does not change."""
    before = builtin_schemes()

    class EntryPoint:
        name = "duck_entry_point"

        def load(self):
            return importlib.import_module("my_bias_pkg.biases").DuckBias

    entry_points = lambda group: [EntryPoint()] if group == "relpos.positions" else []
    monkeypatch.setattr(registry, "metadata", SimpleNamespace(entry_points=entry_points))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert "duck_entry_point" in P.available()
    assert builtin_schemes() == before
    s = P.build("duck_entry_point", num_heads=2, head_dim=4)
    np.testing.assert_allclose(s.bias(jnp.arange(3), jnp.arange(3))[1, 2, 0], -1.0)


def test_bad_import_path_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot import position scheme 'no_such_pkg.x:Y'"):
        P.build("no_such_pkg.x:Y", num_heads=2, head_dim=4)


def test_cli_selects_out_of_tree_scheme(plugin, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "relpos.cli", "train", "bias=none",
           "bias.name=my_bias_pkg.biases:GaussianBias", "+bias.width=32",
           *tiny_args(corpus, tmp_path / "cache"), "train.steps=4", "train.batch_size=2",
           "train.log_every=2", "eval.tokens=256", f"hydra.run.dir={run}"]
    env = {"PYTHONPATH": str(plugin), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    assert results["bias"] == "my_bias_pkg.biases:GaussianBias"
    assert results["bias_options"] == {"width": 32}
    assert all(np.isfinite(e["loss"]) for e in results["eval"])


class PlainArrayBias(P.PositionScheme):
    def __init__(self, *, num_heads, head_dim, rngs):
        self.w = jnp.ones((num_heads,))  # neither an nnx.Param nor a tuple

    def bias(self, q_pos, k_pos):
        return jnp.zeros((self.w.shape[0], len(q_pos), len(k_pos)))


def test_a_plain_array_attribute_is_one_clear_error():
    with pytest.raises(P.RelposConfigError, match=r"keeps a plain array in attribute 'w': "
                                                  r"wrap a learned one in nnx.Param"):
        P.build(f"{__name__}:PlainArrayBias", num_heads=2, head_dim=4)


def _readme_block(marker: str) -> str:
    """The README's python block that starts with ``marker`` (its first line)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index(marker)
    return text[start:text.index("```", start)]


CONTENT_SCHEMES = ["TokenDecay", "LengthTemperature", "CountedDistance", "SigmoidAttention"]


@pytest.fixture
def content_plugin(tmp_path, monkeypatch):
    """The README's out-of-tree schemes of each score-hook kind, as a package in tmp_path."""
    monkeypatch.delitem(sys.modules, "my_pkg.content", raising=False)
    monkeypatch.delitem(sys.modules, "my_pkg", raising=False)
    pkg = tmp_path / "my_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "content.py").write_text(_readme_block("# my_pkg/content.py"))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


def test_readme_content_schemes_run_dense_and_blockwise(content_plugin):
    cfg = ModelConfig(vocab_size=50, d_model=32, num_layers=2, num_heads=4, block_size=16,
                      share_position=False)
    tokens = jnp.arange(40).reshape(1, 40) % 50
    for name in CONTENT_SCHEMES:
        model = TransformerLM(cfg, f"my_pkg.content:{name}", {}, rngs=nnx.Rngs(0))
        dense = model(tokens, impl="dense")
        assert np.isfinite(np.asarray(dense)).all(), name
        np.testing.assert_allclose(model(tokens, impl="blockwise"), dense, rtol=1e-5,
                                   atol=1e-5, err_msg=name)
        assert len(model.layer_positions) == 1  # one module per layer for every hook kind


@pytest.mark.slow  # 7 CLI runs, ~20 s; the same schemes run dense and blockwise above
def test_cli_trains_each_readme_content_scheme(content_plugin, tmp_path):
    """One relpos-train multirun over the four schemes (one process start), one training
    step each: the step (forward, gradients, update) and the evaluation run."""
    corpus = write_corpus(tmp_path / "corpus.txt")
    sweep = tmp_path / "sweep"
    names = ",".join(f"my_pkg.content:{n}" for n in CONTENT_SCHEMES)
    cmd = [sys.executable, "-m", "relpos.cli", "train", "-m", "bias=none",
           f"bias.name={names}", *tiny_args(corpus, tmp_path / "cache", multiples="[1]"),
           "train.steps=1", "train.batch_size=2", "train.log_every=1", "eval.tokens=64",
           f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]
    env = {"PYTHONPATH": str(content_plugin), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HOME": str(tmp_path)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = set()
    for i in range(len(CONTENT_SCHEMES)):
        results = json.loads((sweep / str(i) / "results.json").read_text())
        seen.add(results["bias"].split(":")[1])
        assert all(np.isfinite(e["loss"]) for e in results["eval"])
    assert seen == set(CONTENT_SCHEMES)
