"""Dense vs blockwise agreement of the content-reading schemes (issue 17's figure):
T = 1024, key blocks of 128, fp32, values and gradients (q, k, v and the scheme's
parameters) of sum(out * w); prints the largest absolute difference per
scheme (and the largest magnitude it is a difference of) and writes them as JSON.

    python benchmarks/content_agreement.py --out benchmarks/content-schemes-agreement.json
"""

import argparse
import datetime
import json
import platform

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import relpos.positions as P
from relpos.nn import attention as A
from relpos.nn.transformer import score_hooks

H, D, T, BLOCK = 2, 8, 1024, 128
SCHEMES = ["cope", "dape", "fox", "stickbreaking", "ssmax", "hard_alibi", "yarn"]


def attend(scheme, q, k, v, x, impl):
    pos = jnp.arange(q.shape[1])
    if callable(getattr(scheme, "rotate", None)):
        q, k = scheme.rotate(q, k, pos, pos)
    bias = scheme.bias if callable(getattr(scheme, "bias", None)) else None
    return A.causal_attention(q, k, v, q_pos=pos, k_pos=pos, bias=bias, impl=impl,
                              block_size=BLOCK, hooks=score_hooks(scheme, 0, x, pos))


def measure(name: str, emb_std: float) -> dict:
    s = P.build(name, num_heads=H, head_dim=D, rngs=nnx.Rngs(0))
    if name == "cope":  # its embeddings start at zero
        s.emb[...] = emb_std * jax.random.normal(jax.random.key(7), s.emb.shape)
    keys = jax.random.split(jax.random.key(3), 5)
    q, k, v = (jax.random.normal(kx, (1, T, H, D)) for kx in keys[:3])
    x = jax.random.normal(keys[3], (1, T, H * D))
    w = jax.random.normal(keys[4], (1, T, H, D))
    graphdef, params, rest = nnx.split(s, nnx.Param, ...)

    def loss(qkv, p, impl):
        out = attend(nnx.merge(graphdef, p, rest), *qkv, x, impl)
        return (out * w).sum(), out

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    both = jax.jit(lambda qkv, p: (grad(qkv, p, "dense"), grad(qkv, p, "blockwise")))
    ((_, od), gd), ((_, ob), gb) = both((q, k, v), params)
    gd, gb = jax.tree.leaves(gd), jax.tree.leaves(gb)
    err = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max())  # noqa: E731
    big = lambda xs: max(float(np.abs(np.asarray(a)).max()) for a in xs)  # noqa: E731
    return {"scheme": name, "value_max_abs": err(ob, od), "value_scale": big([od]),
            "grad_max_abs": max(err(a, b) for a, b in zip(gb, gd)), "grad_scale": big(gd),
            "param_grad_max_abs": max([err(a, b) for a, b in zip(gb[3:], gd[3:])] or [0.0]),
            "param_grad_scale": big(gd[3:]) if len(gd) > 3 else 0.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--cope-emb-std", type=float, default=0.1)
    args = ap.parse_args()
    rows = []
    for name in SCHEMES:
        r = measure(name, args.cope_emb_std)
        rows.append(r)
        print(f"{name:14s} values {r['value_max_abs']:.2e} (of {r['value_scale']:.2g})  "
              f"gradients {r['grad_max_abs']:.2e} (of {r['grad_scale']:.3g}); scheme "
              f"parameters {r['param_grad_max_abs']:.2e} (of {r['param_grad_scale']:.3g})",
              flush=True)
    if args.out:
        now = datetime.datetime.now(datetime.UTC)
        meta = {"created": now.isoformat(timespec="seconds"),
                "host": platform.node(), "backend": jax.default_backend(), "T": T,
                "block": BLOCK, "heads": H, "head_dim": D, "dtype": "float32",
                "cope_emb_std": args.cope_emb_std, "rows": rows}
        with open(args.out, "w") as f:
            json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()
