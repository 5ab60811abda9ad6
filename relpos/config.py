"""Typed schemas for the Hydra configs in ``configs/``.

The YAML files start from these dataclasses (``defaults: [schema, ...]``), so a
misspelt key fails at start-up naming the key. ``bias`` is the exception: its keys are
the options of the chosen scheme, checked against the scheme's constructor by
:func:`relpos.positions.build` (which names the bad key and lists the valid ones).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from relpos.model import ModelConfig


def config_dir() -> str:
    """Absolute path of the packaged config tree (``relpos.configs``), falling back to
    the source checkout's top-level ``configs/``."""
    try:
        import relpos.configs as pkg  # installed or editable: configs/ mapped into the package

        return str(Path(pkg.__path__[0]).resolve())
    except ImportError:
        return str(Path(__file__).resolve().parent.parent / "configs")


@dataclass
class ModelSection:
    """See :class:`relpos.model.ModelConfig`; ``preset`` is only a label."""

    preset: str = "tiny"
    vocab_size: int | None = None  # None: taken from the tokenizer
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 4
    tie_embeddings: bool = True
    dtype: str = "float32"
    bias_inside_scale: bool = False
    share_position: bool = True
    attn_impl: str = "auto"
    block_size: int = 512
    dense_max_len: int = 2048

    def to_model_config(self, vocab_size: int) -> ModelConfig:
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)
              if f.name != "vocab_size"}
        return ModelConfig(vocab_size=self.vocab_size or vocab_size, **kw)


@dataclass
class HubSection:
    path: str = ""  # e.g. Salesforce/wikitext
    name: str | None = None  # e.g. wikitext-103-raw-v1
    text_column: str = "text"
    train_split: str = "train"
    val_split: str | None = "validation"  # None: split documents by hash
    join_lines: bool = False  # line-per-row datasets (WikiText): concatenate rows


@dataclass
class DataSection:
    source: str = "stdlib"  # stdlib | text_files | hub
    name: str = "stdlib"  # label used in results and the cache key
    paths: list[str] = field(default_factory=list)  # for text_files
    hub: HubSection = field(default_factory=HubSection)
    tokenizer: str = "bytes"  # bytes | bpe | hub:<name-or-path>
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05  # documents by hash, when the corpus has no split
    cache_dir: str = "~/.cache/relpos"
    max_documents: int | None = None  # cap for quick experiments


@dataclass
class TrainSection:
    length: int = 128
    steps: int = 1000
    batch_size: int = 16
    log_every: int = 50
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: evaluate only at the end
    # steps per compiled call (lax.scan); null: on CPU the largest <= 25 dividing the host
    # intervals (log/checkpoint/eval), 1 on other backends
    steps_per_call: int | None = None
    randomized_positions: int = 0  # >0: Ruoss et al. 2023, positions from [0, N)
    on_nonfinite: str = "error"  # error | skip
    parallel: str = "none"  # none | data | fsdp: over all devices (relpos.parallel)
    distributed: bool = False  # call jax.distributed.initialize() first (multi-host)
    progress: bool = True


@dataclass
class OptimSection:
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # AdamW's decay pulls rarely trained table rows (the largest offsets) towards zero,
    # which confounds the extrapolation study; off by default, as for norms and biases.
    decay_position_tables: bool = False
    # Learning rate of the position scheme's parameters = lr * position_lr_scale. Adam
    # moves a parameter by at most ~lr per step, so a short run caps how far a learned
    # bias (an offset or T5 table entry) can move; T5 itself trained far longer. The
    # scale multiplies the whole AdamW update, so decoupled weight decay on those
    # parameters (FIRE's MLP kernels; tables with decay_position_tables) scales too.
    position_lr_scale: float = 1.0


@dataclass
class EvalSection:
    multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    lengths: list[int] | None = None  # absolute lengths; overrides multiples
    modes: list[str] = field(default_factory=lambda: ["nonoverlap", "sliding"])
    stride: int = 0  # sliding stride; 0: half the window
    tokens: int = 16384  # scored target tokens per (length, mode)
    batch_tokens: int = 16384  # windows per forward = max(1, batch_tokens // length)
    loss_chunk: int = 2048  # LM head + loss over this many positions at a time


@dataclass
class TrainConfig:
    bias: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection)
    seed: int = 0
    experiment: str = "default"
    label: str | None = None  # legend label in plots (default: the scheme name)


@dataclass
class EvalConfig:
    run_dir: str = "???"
    eval: EvalSection = field(default_factory=EvalSection)
    # Eval-time overrides of position-scheme options (e.g. rope interpolation).
    bias_overrides: dict[str, Any] = field(default_factory=dict)
    output: str = "eval_results.json"  # relative to run_dir


@dataclass
class PlotConfig:
    inputs: list[str] = field(default_factory=lambda: ["multirun"])
    out_dir: str = "figures"
    title: str = ""
    merge_to: str | None = None  # also write every run's results (+ bias profile) here


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    cs.store(name="plot_schema", node=PlotConfig)
