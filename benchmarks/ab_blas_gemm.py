"""Is the CPU training step limited by XLA:CPU's GEMM kernels?

Times the ``small`` training step (``relpos.bench.cases.JaxCase``) with the model's Linear
layers computed three ways, alternating in one process:

* ``xla_3d``: ``nnx.Linear`` on the ``[B, T, D]`` input (relpos before it flattened);
* ``xla_2d``: ``relpos.layers.Linear`` as shipped (input flattened to ``[B*T, D]``);
* ``blas``: every product of the layer (forward and both backward) through the ``sgemm``
  of the OpenBLAS inside SciPy (a dependency of jaxlib; function pointer from
  ``scipy.linalg.cython_blas``), called from a small XLA FFI handler compiled here with
  the system C++ compiler, on XLA's buffers without copying. It is checked against
  ``jnp.matmul`` and timed alone first.

    python benchmarks/ab_blas_gemm.py --out benchmarks/ab-blas-gemm.json
    OPENBLAS_THREAD_TIMEOUT=4 python benchmarks/ab_blas_gemm.py   # OpenBLAS spins less
    OPENBLAS_NUM_THREADS=1 taskset -c 0 python benchmarks/ab_blas_gemm.py   # one core

An experiment, not part of relpos: it needs a C++ compiler and the jaxlib headers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import step_case  # benchmarks/ is this script's sys.path[0]
from flax import nnx

from relpos.layers import Linear

SOURCE = r"""
#include "xla/ffi/api/ffi.h"
namespace ffi = xla::ffi;
typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*,
                        const float*, const float*, const int*, const float*, const int*,
                        const float*, float*, const int*);
static sgemm_t g_sgemm = nullptr;
extern "C" void ab_set_sgemm(void* p) { g_sgemm = reinterpret_cast<sgemm_t>(p); }

// Row-major C = op(A) op(B), computed as the column-major C^T = op(B)^T op(A)^T.
static ffi::Error Gemm(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> c, bool ta, bool tb) {
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != 2 || db.size() != 2) return ffi::Error::InvalidArgument("2-D operands");
  int p = da[0], q = da[1], r = db[0], s = db[1];
  int m = ta ? q : p, k = ta ? p : q, n = tb ? r : s;
  auto dc = c->dimensions();
  if ((tb ? s : r) != k || dc.size() != 2 || dc[0] != m || dc[1] != n)
    return ffi::Error::InvalidArgument("operand or result shapes do not match");
  const float one = 1.f, zero = 0.f;
  char opb = tb ? 'T' : 'N', opa = ta ? 'T' : 'N';
  g_sgemm(&opb, &opa, &n, &m, &k, &one, b.typed_data(), &s, a.typed_data(), &q, &zero,
          c->typed_data(), &n);
  return ffi::Error::Success();
}
XLA_FFI_DEFINE_HANDLER_SYMBOL(AbGemm, Gemm,
    ffi::Ffi::Bind().Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
        .Ret<ffi::Buffer<ffi::F32>>().Attr<bool>("trans_a").Attr<bool>("trans_b"));
"""


def build_gemm(workdir: Path):
    """Compile and register the handler; returns ``gemm(a, b, ta=False, tb=False)``."""
    src, lib_path = workdir / "gemm.cc", workdir / "libabgemm.so"
    src.write_text(SOURCE)
    subprocess.run(["c++", "-O2", "-shared", "-fPIC", "-std=c++17", "-w",
                    f"-I{jax.ffi.include_dir()}", str(src), "-o", str(lib_path)], check=True)
    lib = ctypes.cdll.LoadLibrary(str(lib_path))
    import scipy.linalg.cython_blas as cython_blas

    capsule = cython_blas.__pyx_capi__["sgemm"]
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = (
        ctypes.c_char_p, [ctypes.py_object])
    api.PyCapsule_GetPointer.restype, api.PyCapsule_GetPointer.argtypes = (
        ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p])
    lib.ab_set_sgemm(ctypes.c_void_p(api.PyCapsule_GetPointer(capsule,
                                                              api.PyCapsule_GetName(capsule))))
    jax.ffi.register_ffi_target("ab_gemm", jax.ffi.pycapsule(lib.AbGemm), platform="cpu")

    def gemm(a, b, ta=False, tb=False):
        m, n = a.shape[1 if ta else 0], b.shape[0 if tb else 1]
        return jax.ffi.ffi_call("ab_gemm", jax.ShapeDtypeStruct((m, n), jnp.float32))(
            a, b, trans_a=ta, trans_b=tb)

    return gemm


def blas_dense(gemm):
    """``x [..., k] @ w [k, n]`` with both backward products through ``gemm`` too."""

    @jax.custom_vjp
    def dense(x, w):
        return gemm(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[1])

    def fwd(x, w):
        return dense(x, w), (x, w)

    def bwd(res, dy):
        x, w = res
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        return gemm(dy2, w, tb=True).reshape(x.shape), gemm(x2, dy2, ta=True)

    dense.defvjp(fwd, bwd)
    return dense


@contextlib.contextmanager
def linear_call(call):
    """``relpos.layers.Linear`` layers traced inside the block run ``call(self, x)``."""
    original = Linear.__call__
    Linear.__call__ = call
    try:
        yield
    finally:
        Linear.__call__ = original


def through(dense):
    def call(self, x):
        y = dense(x, self.kernel[...])
        return y if self.bias is None else y + self.bias[...]

    return call


def check(gemm) -> float:
    """Largest |error| against jnp.matmul over the four transpose cases."""
    ka, kb = jax.random.split(jax.random.key(0))
    a, b = jax.random.normal(ka, (67, 45)), jax.random.normal(kb, (45, 39))
    worst = 0.0
    for ta in (False, True):
        for tb in (False, True):
            got = jax.jit(lambda x, y, ta=ta, tb=tb: gemm(x, y, ta, tb))(
                a.T if ta else a, b.T if tb else b)
            worst = max(worst, float(jnp.max(jnp.abs(got - a @ b))))
    np.testing.assert_allclose(np.asarray(gemm(a, b)), np.asarray(a @ b), rtol=1e-5, atol=1e-4)
    return worst


def time_alone(fn, a, b, repeats: int = 20) -> float:
    for _ in range(3):
        fn(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(a, b).block_until_ready()
    return (time.perf_counter() - t0) / repeats


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    step_case.add_arguments(p, steps_per_call=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    k = args.steps_per_call
    with tempfile.TemporaryDirectory() as tmp:
        gemm = build_gemm(Path(tmp))
        max_err = check(gemm)
        alone = {}
        for m, kk, n in [(4096, 256, 768), (4096, 256, 1024), (4096, 1024, 256)]:
            a, b = jnp.ones((m, kk)), jnp.ones((kk, n))
            flops = 2 * m * kk * n
            alone[f"{m}x{kk}x{n}"] = {
                name: round(flops / time_alone(jax.jit(fn), a, b) / 1e9, 1)
                for name, fn in (("blas_gflops", gemm), ("xla_gflops", jnp.matmul))}
            print(f"{m}x{kk}x{n} alone: {alone[f'{m}x{kk}x{n}']}")
        cases = {}
        for name, ctx in (("xla_3d", linear_call(nnx.Linear.__call__)),
                          ("xla_2d", contextlib.nullcontext()),
                          ("blas", linear_call(through(blas_dense(gemm))))):
            with ctx:  # the patch matters while tracing, i.e. while the case compiles
                cases[name] = step_case.build(args)
            cases[name].run(k)
        ms = {name: [] for name in cases}
        for r in range(args.rounds):
            for name, case in cases.items():
                ms[name].append(case.run(2 * k) / (2 * k) * 1000)
                print(f"round {r} {name}: {ms[name][-1]:.0f} ms/step", flush=True)
    med = {name: statistics.median(v) for name, v in ms.items()}
    result = {
        "what": f"{args.preset} {args.scheme} training step (batch {args.batch}, T "
                f"{args.length}, fp32, {k} steps per call), Linear layers on 3-D input "
                "(nnx.Linear), flattened (relpos), or through SciPy's OpenBLAS sgemm (XLA "
                "FFI, zero-copy); alternating in one process",
        "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)), "jax": jax.__version__,
        **{v: os.environ.get(v) for v in ("OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_NUM_THREADS")},
        "max_abs_error_vs_jnp_matmul": max_err, "alone": alone,
        "ms_per_step": ms, "median_ms": med,
        "over_xla_2d": {name: v / med["xla_2d"] for name, v in med.items()},
    }
    print("median ms/step: " + ", ".join(f"{n} {v:.0f}" for n, v in med.items())
          + " (/ xla_2d: " + ", ".join(f"{n} {v:.3f}" for n, v in
                                        result["over_xla_2d"].items()) + ")")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
