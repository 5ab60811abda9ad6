"""The extrapolation study's pipeline end to end on a miniature: the reproduce script
(two schemes, a few steps) leaves figures, tables and a merged results file."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from helpers import tiny_args, write_corpus

from relpos.evaluation import bias_profile
from relpos.model import ModelConfig, TransformerLM
from relpos.io import profile_offsets
from relpos.positions.alibi import alibi_slopes

ROOT = Path(__file__).resolve().parents[1]


def test_bias_profile_matches_alibi_formula():
    model = TransformerLM(ModelConfig(vocab_size=11, d_model=16, num_heads=4, num_layers=1),
                          "alibi", rngs=nnx.Rngs(0))
    prof = bias_profile(model, train_length=16, max_length=1024)
    offsets = np.asarray(prof["offsets"])
    assert offsets[0] == 0 and offsets[-1] == 1023 and np.all(np.diff(offsets) > 0)
    assert set(range(32)) <= set(offsets.tolist())  # every offset up to 2x train length
    want = -np.asarray(alibi_slopes(4))[:, None] * offsets[None, :]
    np.testing.assert_allclose(prof["at_max"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(prof["at_train"], want[:, offsets < 16], rtol=1e-6, atol=1e-6)
    assert np.asarray(prof["window"]).shape == (4, 32, 32)


def test_profile_offsets_small_cases():
    assert profile_offsets(4, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert profile_offsets(4, 3).tolist() == [0, 1, 2]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("presets", [
    pytest.param(("quick",), id="quick"),
    # the re-evaluating presets add about 45 s on 2 cores: run on purpose (-m slow)
    pytest.param(("quick", "ablation", "context"), id="all", marks=pytest.mark.slow),
])
def test_reproduce_script_miniature(tmp_path, presets):
    corpus = write_corpus(tmp_path / "corpus.txt")
    env = dict(os.environ, RELPOS_STUDY_DIR=str(tmp_path / "study"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    overrides = ["bias=alibi,offset", "seed=0", "train.steps=6", "train.batch_size=2",
                 "train.log_every=3", "train.checkpoint_every=6", "eval.tokens=256",
                 *tiny_args(corpus, tmp_path / "cache", multiples="[1,4]"),
                 "hydra.sweeper.params.seed=0"]
    for preset in presets:
        out = subprocess.run(["bash", str(ROOT / "scripts/reproduce_extrapolation.sh"), preset,
                              *overrides], capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    study = tmp_path / "study"
    for preset in (p for p in presets if p != "context"):
        figs = study / "figures" / preset
        for name in ("ppl_vs_length.png", "position_loss.png", "bias_profiles.png",
                     "offset_counts.png"):
            assert (figs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        table = (figs / "table.md").read_text()
        assert "| alibi |" in table and "offset" in table
        merged = json.loads((study / "results" / f"{preset}.json").read_text())
        assert all(r["bias_profile"] for r in merged)
    assert (study / "figures" / "quick" / "bias_heatmap_alibi.png").exists()
    quick = {r["label"] for r in json.loads((study / "results" / "quick.json").read_text())}
    assert quick == {"alibi", "offset"}  # the re-evaluations belong to the ablation
    if presets == ("quick",):
        assert not (study / "figures" / "quick" / "plot.log").exists()
        return
    labels = {r["label"] for r in json.loads((study / "results" / "ablation.json").read_text())}
    assert {"offset (zero beyond L)", "offset (mask beyond L)", "offset (4L table)",
            "offset (4L table + decay)", "offset (randomized positions)", "t5 (max_distance L)",
            "t5 (max_distance 2L)", "alibi", "offset"} <= labels
    context = {r["label"]: r for r in json.loads((study / "results" / "context.json").read_text())}
    assert sorted(context) == ["alibi", "alibi (keys < 64)"]
    assert context["alibi (keys < 64)"]["key_window"] == 64
    assert not any((study / "figures" / p / "plot.log").exists()
                   for p in ("quick", "ablation", "context"))
