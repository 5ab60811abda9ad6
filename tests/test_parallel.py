"""Data-parallel / FSDP training on 4 simulated CPU devices equals 1-device training.

The device count must be fixed before JAX initialises, so the comparison runs in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from relpos.parallel import fsdp_spec

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from relpos.config import OptimSection
    from relpos.model import ModelConfig, TransformerLM
    from relpos.parallel import (data_mesh, make_parallel_train_step, place_batch,
                                 place_state)
    from relpos.train import fresh_guard, lm_loss, make_optimizer, make_train_step

    assert len(jax.devices()) == 4, jax.devices()
    STEPS, B, T = 3, 8, 32
    cfg = ModelConfig(vocab_size=257, d_model=64, num_layers=2, num_heads=4)

    def fresh():
        model = TransformerLM(cfg, "alibi", rngs=nnx.Rngs(params=0))
        graphdef, params = nnx.split(model, nnx.Param)
        # warmup 0: full learning rate from step 1, so the updates are not vanishingly small
        tx, _ = make_optimizer(OptimSection(warmup_steps=0), 10, params)
        return graphdef, tx, params, tx.init(params), fresh_guard()

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 257, (B, T + 1)).astype(np.int32) for _ in range(STEPS)]
    pos = np.arange(T, dtype=np.int32)

    def run(mode):
        graphdef, tx, params, opt, guard = fresh()
        grad_fn = jax.jit(jax.grad(lambda p, t, q: lm_loss(nnx.merge(graphdef, p), t, q)))
        if mode == "single":
            step = make_train_step(graphdef, tx)
            place = lambda t, p: (jnp.asarray(t), jnp.asarray(p))
        else:
            mesh = data_mesh()
            fsdp = mode == "fsdp"
            step = make_parallel_train_step(graphdef, tx, mesh, params, opt, fsdp=fsdp)
            params, opt, guard = place_state(mesh, (params, opt, guard), fsdp=fsdp)
            place = lambda t, p: place_batch(mesh, t, p)
        grads = [np.asarray(x) for x in jax.tree.leaves(grad_fn(params, *place(batches[0], pos)))]
        losses = []
        for i, toks in enumerate(batches):
            params, opt, guard, m = step(params, opt, guard, *place(toks, pos), jnp.int32(i))
            losses.append(float(m["loss"]))
        if mode == "dp":  # again, all steps in one call (train.steps_per_call)
            _, _, params1, opt1, guard1 = fresh()
            multi = make_parallel_train_step(graphdef, tx, mesh, params1, opt1, multi=True)
            state = place_state(mesh, (params1, opt1, guard1))
            toks, p = place_batch(mesh, np.stack(batches), pos, stacked=True)
            *state, m = multi(*state, toks, p, jnp.int32(0))
            multi_losses = [float(x) for x in m["loss"]]
            multi_spec = str(toks.sharding.spec)
            multi_rel = diff([np.asarray(x) for x in jax.tree.leaves(state[0])],
                             [np.asarray(x) for x in jax.tree.leaves(params)]) / norm(
                                 [np.asarray(x) for x in jax.tree.leaves(params)])
            # per-step, per-row positions (randomized positions): [n, B, T] follows the batch
            rpos = np.sort(np.random.default_rng(1).integers(0, 100, (STEPS, B, T)),
                           axis=-1).astype(np.int32)
            _, _, p1, o1, g1 = fresh()
            *_, m_one = make_train_step(graphdef, tx, multi=True)(
                p1, o1, g1, jnp.asarray(np.stack(batches)), jnp.asarray(rpos), jnp.int32(0))
            _, _, p2, o2, g2 = fresh()
            multi_r = make_parallel_train_step(graphdef, tx, mesh, p2, o2, multi=True,
                                               batched_positions=True)
            toks, rp = place_batch(mesh, np.stack(batches), rpos, stacked=True)
            *_, m_mesh = multi_r(*place_state(mesh, (p2, o2, g2)), toks, rp, jnp.int32(0))
            rand = {"one": [float(x) for x in m_one["loss"]],
                    "mesh": [float(x) for x in m_mesh["loss"]], "spec": str(rp.sharding.spec)}
        leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
        shards = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(params)})
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(params)
                        if hasattr(x.sharding, "spec")})
        extra = {"multi_losses": multi_losses, "multi_spec": multi_spec,
                 "multi_param_rel": multi_rel, "random_positions": rand} if mode == "dp" else {}
        return losses, leaves, shards, specs, grads, extra

    norm = lambda xs: float(np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in xs)))
    diff = lambda xs, ys: norm([x - y for x, y in zip(xs, ys)])
    ref_losses, ref_leaves, _, _, ref_grads, _ = run("single")
    init_leaves = [np.asarray(x) for x in jax.tree.leaves(fresh()[2])]
    out = {"single": ref_losses}
    for mode in ("dp", "fsdp"):
        losses, leaves, shards, specs, grads, extra = run(mode)
        out[mode] = {
            "losses": losses,
            "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
            # norm-wise relative differences (elementwise ratios are meaningless where
            # a gradient is at rounding level: Adam's g / sqrt(v) turns it into O(lr))
            "grad_rel": diff(grads, ref_grads) / norm(ref_grads),
            "param_rel": diff(leaves, ref_leaves) / norm(ref_leaves),
            "param_rel_to_update": diff(leaves, ref_leaves) / diff(ref_leaves, init_leaves),
            "param_max_abs": max(float(np.abs(a - b).max()) for a, b in zip(leaves, ref_leaves)),
            "device_sets": shards, "specs": specs, **extra,
        }
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def parallel_result():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["dp", "fsdp"])
def test_sharded_training_matches_single_device(parallel_result, mode):
    """3 AdamW steps on 4 devices vs 1 device: losses elementwise within rtol 1e-5;
    first-step gradients and final parameters norm-wise within 1e-5 (measured: loss
    1.7e-7, grads 3e-7 / 7e-7, params 8e-7 (dp) / 5e-6 (fsdp)).

    Parameters are compared norm-wise because elements whose gradient is at rounding
    level get an O(lr) Adam step of either sign (g / sqrt(v)), so their elementwise
    difference measures the optimiser, not the sharding.
    """
    r = parallel_result[mode]
    np.testing.assert_allclose(r["losses"], parallel_result["single"], rtol=1e-5)
    assert r["grad_rel"] < 1e-5, r
    assert r["param_rel"] < 1e-5, r


def test_several_steps_per_call_on_the_mesh(parallel_result):
    """The 3 data-parallel steps as one call (train.steps_per_call=3): the stacked batch
    is split along its batch axis (axis 1) and the result is the one-call-per-step run's."""
    r = parallel_result["dp"]
    assert r["multi_spec"] == "P(None, 'data')"
    np.testing.assert_allclose(r["multi_losses"], r["losses"], rtol=1e-5)
    assert r["multi_param_rel"] < 1e-5, r
    rand = r["random_positions"]  # [n, B, T] positions, split like the tokens
    assert rand["spec"] == "P(None, 'data')"
    np.testing.assert_allclose(rand["mesh"], rand["one"], rtol=1e-5)
    assert not np.allclose(rand["one"], r["losses"])  # the positions did change the losses


def test_layouts(parallel_result):
    assert parallel_result["dp"]["device_sets"] == [4]
    assert parallel_result["dp"]["specs"] == ["P()"]  # replicated
    assert parallel_result["fsdp"]["device_sets"] == [4]
    assert {"P('data',)", "P(None, 'data')"} <= set(parallel_result["fsdp"]["specs"])


def test_fsdp_spec_picks_largest_divisible_axis():
    assert tuple(fsdp_spec((64, 192), 4)) == (None, "data")
    assert tuple(fsdp_spec((257, 64), 4)) == (None, "data")
    assert tuple(fsdp_spec((6,), 4)) == ()
    assert tuple(fsdp_spec((), 4)) == ()
    assert tuple(fsdp_spec((8, 8), 1)) == ()


def test_cli_data_parallel_matches_single_device(tmp_path):
    """relpos-train train.parallel=data on 2 simulated devices ends where 1 device does."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"row {i}: {i * 31 % 97} apples, {i % 7} pears\n"
                              for i in range(800)))
    results = {}
    for mode in ("none", "data", "fsdp"):
        run = tmp_path / mode
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        cmd = [sys.executable, "-m", "relpos.cli", "train", "bias=alibi", "model.d_model=32",
               "model.num_layers=1", "model.num_heads=2", "train.length=16", "train.steps=6",
               "train.batch_size=4", "train.log_every=3", "train.progress=false",
               f"train.parallel={mode}", "eval.multiples=[1,2]", "eval.tokens=256",
               "data=text_files", f"data.paths=[{corpus}]",
               f"data.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run}"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        results[mode] = json.loads((run / "results.json").read_text())
    for mode in ("data", "fsdp"):
        np.testing.assert_allclose(results[mode]["final_train_loss"],
                                   results["none"]["final_train_loss"], rtol=1e-5)
        for a, b in zip(results[mode]["eval"], results["none"]["eval"]):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
