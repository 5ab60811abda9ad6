"""The peer of ``relpos-bench --peer``: lucidrains' x-transformers with ALiBi (PyTorch,
CPU, eager) at relpos's sizes, timed as one more round-robin case.

``torch`` and ``x_transformers`` are optional (``pip install 'relpos[bench]'``), so they
are imported only when a peer is built; without them :func:`peer_case` says why.
"""

from __future__ import annotations

import time
from importlib import metadata

from relpos.bench.report import cpu_threads
from relpos.config import OptimSection
from relpos.nn import ModelConfig


class PeerCase:
    """lucidrains/x-transformers ``TransformerWrapper`` + ``Decoder(alibi_pos_bias=True)``,
    PyTorch AdamW (same betas, decay, clipping as relpos), fp32, CPU, eager."""

    name = "x-transformers(alibi)"

    def __init__(self, mcfg: ModelConfig, *, batch: int, length: int, threads: int,
                 seed: int = 0):
        # optional dependencies (relpos[bench]), possibly missing: imported lazily
        import torch
        from x_transformers import Decoder, TransformerWrapper

        torch.manual_seed(seed)
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = TransformerWrapper(
            num_tokens=mcfg.vocab_size, max_seq_len=length,
            attn_layers=Decoder(dim=mcfg.d_model, depth=mcfg.num_layers,
                                heads=mcfg.num_heads, alibi_pos_bias=True))
        o = OptimSection()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2),
                                     eps=o.eps, weight_decay=o.weight_decay)
        self.clip = o.clip_norm
        self.tokens = torch.randint(0, mcfg.vocab_size, (batch, length + 1))
        self.params_total = sum(p.numel() for p in self.model.parameters())
        self.versions = {"torch": torch.__version__, "x_transformers": _version("x-transformers"),
                         "threads": torch.get_num_threads()}
        t0 = time.perf_counter()
        self.loss = self._step()
        self.compile_s = None
        self.first_step_s = time.perf_counter() - t0

    def _step(self) -> float:
        torch = self.torch
        x, y = self.tokens[:, :-1], self.tokens[:, 1:]
        logits = self.model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss.detach()

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.loss = self._step()
        return time.perf_counter() - t0

    def summary(self) -> dict:
        return {"compile_s": None, "first_step_s": self.first_step_s,
                "params": self.params_total, "final_loss": float(self.loss), **self.versions}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def peer_case(mcfg: ModelConfig, *, batch: int, length: int) -> tuple[PeerCase | None, str]:
    """A :class:`PeerCase`, or None and the reason it is unavailable."""
    try:
        # optional dependencies, possibly missing: only probed here, when a peer is asked for
        import torch  # noqa: F401
        import x_transformers  # noqa: F401
    except ImportError as e:
        return None, (f"not importable ({e}); install torch and x-transformers "
                      "(pip install 'relpos[bench]') to compare")
    try:
        return PeerCase(mcfg, batch=batch, length=length, threads=cpu_threads()), ""
    except Exception as e:  # noqa: BLE001 - a peer's API change must not sink our numbers
        return None, f"failed to build: {type(e).__name__}: {e}"
