"""Where the time goes in the ``small`` training step on CPU (relpos-bench companion).

Times variants of the real step (make_train_step + make_optimizer, small preset, batch 16,
T 256, fp32) round-robin in one process, so ratios between them are comparable on a
noisy machine. Attention variants are swapped in by monkeypatching
``relpos.nn.attention.dense_attention`` *in this process only* (the library is unchanged).

    python benchmarks/profile_small_step.py --out benchmarks/profile-small-cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import relpos.nn.attention as attn
import relpos.nn.transformer as model_lib
from relpos.bench.cases import preset_config, scheme_options
from relpos.bench.peer import PeerCase
from relpos.bench.report import cpu_threads
from relpos.config import OptimSection
from relpos.io import atomic_write_json
from relpos.nn import TransformerLM
from relpos.training.step import fresh_guard, lm_loss, make_optimizer, make_train_step

ORIGINAL = attn.dense_attention
ORIGINAL_BLOCK = model_lib.Block.__call__


# ------------------------------------------------------------------ attention variants


def sdpa_xla(q, k, v, *, bias, q_pos, k_pos, scale, bias_inside_scale=False):
    """jax.nn.dot_product_attention(implementation='xla'), bias [1, H, T, T] fp32."""
    dense = attn.evaluate_bias(bias, q_pos, k_pos)
    if dense is not None:
        if bias_inside_scale:
            dense = dense * scale
        dense = dense if dense.ndim == 4 else dense[None]
    return jax.nn.dot_product_attention(q, k, v, bias=dense, scale=scale, is_causal=True,
                                        implementation="xla")


def bhtd_layout(q, k, v, *, bias, q_pos, k_pos, scale, bias_inside_scale=False):
    """Same math; q pre-scaled, mask folded into the bias as one additive [H,T,T] array
    (one select fewer per layer), explicit [B,H,T,d] layout for the batched matmuls."""
    tq, tk = q.shape[1], k.shape[1]
    q = q * jnp.asarray(scale, q.dtype)
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, H, T, d]
    scores = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32)
    mask = attn._causal_mask(jnp.arange(tq) + (tk - tq), jnp.arange(tk))
    add = jnp.where(mask, 0.0, -jnp.inf).astype(jnp.float32)
    b = attn.evaluate_bias(bias, q_pos, k_pos)
    if b is not None:
        add = add + (b * scale if bias_inside_scale else b)
    probs = jax.nn.softmax(scores + add, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), vh,
                     preferred_element_type=jnp.float32)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def no_attention(q, k, v, **_):
    """Upper bound on attention's share: the block returns v (all matmuls elsewhere kept)."""
    return v


def block_split_qkv(self, x, *, positions, bias, rotate, attn_kw):
    """Block.__call__ with q, k, v taken by ``jnp.split`` of the projection's last axis
    (same parameters, same columns) instead of ``reshape(b, t, 3, h, d)[:, :, i]``,
    whose backward pads three zero arrays and adds them."""
    b, t, _ = x.shape
    q, k, v = (z.reshape(b, t, self.num_heads, self.head_dim)
               for z in jnp.split(self.qkv(self.ln1(x)), 3, axis=-1))
    if rotate is not None:
        q, k = rotate(q, k, positions, positions)
    a = model_lib.causal_attention(q, k, v, q_pos=positions, k_pos=positions, bias=bias,
                                   **attn_kw)
    x = x + self.out(a.reshape(b, t, -1))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x))))


VARIANTS = {"einsum (current)": (ORIGINAL, ORIGINAL_BLOCK),
            "jax.nn.dpa xla": (sdpa_xla, ORIGINAL_BLOCK),
            "bhtd + mask-in-bias": (bhtd_layout, ORIGINAL_BLOCK),
            "split qkv": (ORIGINAL, block_split_qkv),
            "split qkv + bhtd/mask": (bhtd_layout, block_split_qkv),
            "split qkv + dpa xla": (sdpa_xla, block_split_qkv),
            "attention removed": (no_attention, ORIGINAL_BLOCK)}


# ------------------------------------------------------------------ cases


class Case:
    """One compiled function advanced ``n`` times; ``kind`` in step | grad | loss | opt."""

    def __init__(self, name, scheme, variant, kind="step", batch=16, length=256):
        self.name = name
        # read at trace time (causal_attention looks dense_attention up in its module)
        attn.dense_attention, model_lib.Block.__call__ = variant
        try:
            mcfg = preset_config("small")
            model = TransformerLM(mcfg, scheme, scheme_options(scheme, length),
                                  rngs=nnx.Rngs(params=0))
            graphdef, params = nnx.split(model, nnx.Param)
            tx, _ = make_optimizer(OptimSection(), 1000, params)
            self.tokens = jax.random.randint(jax.random.key(1), (batch, length + 1), 0, 257)
            self.pos = jnp.arange(length, dtype=jnp.int32)
            loss = lambda p: lm_loss(nnx.merge(graphdef, p), self.tokens, self.pos)
            self.kind = kind
            if kind == "step":
                self.state = (params, tx.init(params), fresh_guard())
                fn = make_train_step(graphdef, tx)
                args = (*self.state, self.tokens, self.pos, jnp.int32(0))
            elif kind == "grad":
                self.state = params
                fn = jax.jit(jax.value_and_grad(loss))
                args = (params,)
            elif kind == "loss":
                self.state = params
                fn = jax.jit(loss)
                args = (params,)
            else:  # optimizer update alone, on fixed gradients
                grads = jax.tree.map(jnp.ones_like, params)
                self.state = (params, tx.init(params))
                fn = jax.jit(lambda p, o: _apply(tx, grads, p, o), donate_argnums=(0, 1))
                args = self.state
            t0 = time.perf_counter()
            self.fn = fn.lower(*args).compile()
            self.compile_s = time.perf_counter() - t0
            self.first_loss = float(jax.jit(loss)(params)) if kind != "opt" else None
        finally:
            attn.dense_attention, model_lib.Block.__call__ = ORIGINAL, ORIGINAL_BLOCK

    def run(self, n):
        t0 = time.perf_counter()
        s = self.state
        for _ in range(n):
            if self.kind == "step":
                p, o, g, m = self.fn(*s, self.tokens, self.pos, jnp.int32(0))
                s, out = (p, o, g), m
            elif self.kind == "opt":
                s = out = self.fn(*s)
            else:
                out = self.fn(s)
        jax.block_until_ready(out)
        self.state = s
        return time.perf_counter() - t0


def _apply(tx, grads, params, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


class Peer:
    """x-transformers ALiBi step (see relpos.bench.peer.PeerCase), for scale."""

    def __init__(self):
        self.name = "x-transformers alibi (torch)"
        self.case = PeerCase(preset_config("small"), batch=16, length=256,
                             threads=cpu_threads())
        self.compile_s, self.first_loss = 0.0, None

    def run(self, n):
        return self.case.run(n)


def cases(schemes, variants, peer):
    out = []
    for scheme in schemes:
        for vname in variants:
            out.append(Case(f"{scheme} | {vname}", scheme, VARIANTS[vname]))
    cur = VARIANTS["einsum (current)"]
    out += [Case("alibi | forward loss only", "alibi", cur, "loss"),
            Case("alibi | value_and_grad only", "alibi", cur, "grad"),
            Case("optimizer update only", "alibi", cur, "opt")]
    if peer:
        try:
            out.append(Peer())
        except ImportError as e:
            print(f"peer unavailable: {e}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--schemes", default="alibi,none,t5")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--peer", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cs = cases(args.schemes.split(","), args.variants.split(","), args.peer)
    for c in cs:
        c.run(1)
    times = {c.name: [] for c in cs}
    for r in range(args.repeats):
        for c in cs:
            times[c.name].append(c.run(args.steps) / args.steps)
        print(f"round {r + 1}/{args.repeats} done", flush=True)
    base = {s: times[f"{s} | einsum (current)"] for s in args.schemes.split(",")}
    rows = []
    for c in cs:
        scheme = c.name.split(" | ")[0]
        ref = base.get(scheme, base[next(iter(base))])
        ratio = statistics.median(a / b for a, b in zip(times[c.name], ref))
        rows.append({"case": c.name, "ms": statistics.median(times[c.name]) * 1e3,
                     "ratio_to_current": ratio, "compile_s": c.compile_s,
                     "first_loss": c.first_loss,
                     "round_ms": [t * 1e3 for t in times[c.name]]})
        print(f"{c.name:<40}{rows[-1]['ms']:>9.0f} ms{ratio:>8.3f}x{c.compile_s:>7.1f} s"
              f"  loss0={c.first_loss}")
    if args.out:
        atomic_write_json(args.out, {"rows": rows, "steps": args.steps,
                                     "repeats": args.repeats, "jax": jax.__version__,
                                     "note": "ratio_to_current: median over rounds of the "
                                             "per-round time ratio to the same scheme's "
                                             "current (einsum) step"})


if __name__ == "__main__":
    main()
