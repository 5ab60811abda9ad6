"""The 4-device side of test_parallel.py: 3 AdamW steps of a small LM on one device, then
data-parallel and FSDP on a 4-device mesh (and, data-parallel, all steps in one call,
with shared and per-row positions); prints one JSON line of losses, norm-wise relative
differences and shardings for the test to check.

Run as ``python tests/parallel_worker.py`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the device count is fixed when
JAX initialises, so it cannot run inside the pytest process).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from relpos.config import OptimSection
from relpos.model import ModelConfig, TransformerLM
from relpos.training.parallel import (
    data_mesh,
    make_parallel_train_step,
    place_batch,
    place_state,
)
from relpos.training.step import fresh_guard, lm_loss, make_optimizer, make_train_step

STEPS, B, T = 3, 8, 32
CFG = ModelConfig(vocab_size=257, d_model=64, num_layers=2, num_heads=4)


def fresh():
    model = TransformerLM(CFG, "alibi", rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model, nnx.Param)
    # warmup 0: full learning rate from step 1, so the updates are not vanishingly small
    tx, _ = make_optimizer(OptimSection(warmup_steps=0), 10, params)
    return graphdef, tx, params, tx.init(params), fresh_guard()


def norm(xs) -> float:
    return float(np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in xs)))


def diff(xs, ys) -> float:
    return norm([x - y for x, y in zip(xs, ys)])


def leaves_of(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def run(mode, batches, pos):
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
    grads = leaves_of(grad_fn(params, *place(batches[0], pos)))
    losses = []
    for i, toks in enumerate(batches):
        params, opt, guard, m = step(params, opt, guard, *place(toks, pos), jnp.int32(i))
        losses.append(float(m["loss"]))
    extra = {}
    if mode == "dp":  # again, all steps in one call (train.steps_per_call)
        _, _, params1, opt1, guard1 = fresh()
        multi = make_parallel_train_step(graphdef, tx, mesh, params1, opt1, multi=True)
        state = place_state(mesh, (params1, opt1, guard1))
        toks, p = place_batch(mesh, np.stack(batches), pos, stacked=True)
        *state, m = multi(*state, toks, p, jnp.int32(0))
        extra["multi_losses"] = [float(x) for x in m["loss"]]
        extra["multi_spec"] = str(toks.sharding.spec)
        extra["multi_param_rel"] = (diff(leaves_of(state[0]), leaves_of(params))
                                    / norm(leaves_of(params)))
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
        extra["random_positions"] = {"one": [float(x) for x in m_one["loss"]],
                                     "mesh": [float(x) for x in m_mesh["loss"]],
                                     "spec": str(rp.sharding.spec)}
    shards = sorted({len(x.sharding.device_set) for x in jax.tree.leaves(params)})
    specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(params)
                    if hasattr(x.sharding, "spec")})
    return losses, leaves_of(params), shards, specs, grads, extra


def main() -> None:
    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 257, (B, T + 1)).astype(np.int32) for _ in range(STEPS)]
    pos = np.arange(T, dtype=np.int32)
    ref_losses, ref_leaves, _, _, ref_grads, _ = run("single", batches, pos)
    init_leaves = leaves_of(fresh()[2])
    out = {"single": ref_losses}
    for mode in ("dp", "fsdp"):
        losses, leaves, shards, specs, grads, extra = run(mode, batches, pos)
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


if __name__ == "__main__":
    main()
