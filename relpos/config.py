"""Typed schemas for the Hydra configs in ``configs/``, and building a model from them.

Every default is written once, here (the model's in :class:`relpos.nn.ModelConfig`, a
scheme's in its constructor); the YAML files hold presets and interpolations only. The
YAML files start from these dataclasses (``defaults: [train_schema, ...]``), so a
misspelt key or an invalid choice fails at start-up naming the key. ``bias`` is the
exception: its keys are the options of the chosen scheme, checked against the scheme's
constructor by :func:`relpos.positions.build` (which names the bad key and lists the
valid ones).

Fields marked ``FREE`` may differ when a run resumes (how to compute, log or evaluate,
not what is trained); every other field must match the saved run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flax import nnx
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from relpos import positions, tasks
from relpos.errors import RelposError, check_choice
from relpos.io import config_dir
from relpos.nn import ModelConfig, TransformerLM

FREE = {"resume": "free"}  # field metadata: may change between a run and its resume


def choice(default, options: tuple[str, ...], **metadata):
    """A string field that must be one of ``options`` (checked by :func:`check_choices`,
    which names the key and lists the valid values in one line)."""
    return field(default=default, metadata={"choices": tuple(options), **metadata})


_MODEL_FREE = ("attn_impl", "block_size", "dense_max_len")


def _model_section():
    """``ModelSection``: the fields of :class:`ModelConfig` with their defaults (written
    once, there), plus ``preset`` (a label) and ``vocab_size=None`` (the tokenizer's)."""
    hints = typing.get_type_hints(ModelConfig)
    fields = [("preset", str, field(default="tiny")),
              ("vocab_size", int | None, field(default=None))]
    for f in dataclasses.fields(ModelConfig):
        if f.name == "vocab_size":
            continue
        meta = FREE if f.name in _MODEL_FREE else {}  # choices: ModelConfig.validate
        fields.append((f.name, hints[f.name], field(default=f.default, metadata=meta)))
    return dataclasses.make_dataclass("ModelSection", fields)


ModelSection = _model_section()


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
    source: str = choice("stdlib", ("stdlib", "text_files", "hub"))
    name: str = "stdlib"  # label used in results and the cache key
    paths: list[str] = field(default_factory=list)  # for text_files
    hub: HubSection = field(default_factory=HubSection)
    tokenizer: str = "bytes"  # bytes | bpe | hub:<name-or-path>
    bpe_vocab_size: int = 4096
    val_fraction: float = 0.05  # documents by hash, when the corpus has no split
    cache_dir: str = field(default="~/.cache/relpos", metadata=FREE)
    max_documents: int | None = None  # cap for quick experiments


@dataclass
class TrainSection:
    length: int = 128
    steps: int = 600
    batch_size: int = 16
    log_every: int = field(default=50, metadata=FREE)
    checkpoint_every: int = field(default=200, metadata=FREE)
    keep_checkpoints: int = field(default=2, metadata=FREE)
    eval_every: int = field(default=0, metadata=FREE)  # 0: evaluate only at the end
    # steps per compiled call (lax.scan); null: on CPU the largest <= 25 dividing the host
    # intervals (log/checkpoint/eval), 1 on other backends
    steps_per_call: int | None = field(default=None, metadata=FREE)
    randomized_positions: int = 0  # >0: Ruoss et al. 2023, positions from [0, N)
    on_nonfinite: str = choice("error", ("error", "skip"), **FREE)
    parallel: str = choice("none", ("none", "data", "fsdp"), **FREE)  # over all devices
    # where the training windows are gathered: device (the token split on the device once,
    # windows gathered inside the step), host (built on the host); auto: device for the
    # corpus LM when the split fits 2 GiB, host for tasks. Either way the batches are a
    # function of (seed, step), built ahead in a thread (train.prefetch calls ahead)
    loader: str = choice("auto", ("auto", "device", "host"), **FREE)
    prefetch: int = field(default=2, metadata=FREE)  # calls prepared ahead; 0: none
    # several processes train one model (jax.distributed.initialize; with parallel=data or
    # fsdp). The coordinator (host:port of process 0), process count and this process's
    # id: null reads them from the environment (SLURM under srun, or JAX_COORDINATOR_ADDRESS,
    # JAX_NUM_PROCESSES, JAX_PROCESS_ID)
    distributed: bool = field(default=False, metadata=FREE)
    coordinator: str | None = field(default=None, metadata=FREE)
    num_processes: int | None = field(default=None, metadata=FREE)
    process_id: int | None = field(default=None, metadata=FREE)
    progress: bool = field(default=True, metadata=FREE)


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
    # configs/optim/adamw.yaml sets it per scheme: POSITION_LR_SCALE.
    position_lr_scale: float = 1.0


@dataclass
class EvalSection:
    multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    lengths: list[int] | None = None  # absolute lengths; overrides multiples
    # nonoverlap | sliding (checked with the rest of the section: relpos.evaluation)
    modes: list[str] = field(default_factory=lambda: ["nonoverlap", "sliding"])
    stride: int = 0  # sliding stride; 0: half the window
    tokens: int = 16384  # scored target tokens per (length, mode)
    batch_tokens: int = 16384  # windows per forward = max(1, batch_tokens // length)
    loss_chunk: int = 2048  # LM head + loss over this many positions at a time
    progress: bool = True  # a progress bar over the evaluation's windows
    # windows per length > L for the attention mass on keys at offsets >= L (0: off)
    attention_windows: int = 16
    # > 0: evaluate with keys at offsets >= key_window masked, whatever the scheme (does
    # the model use context beyond W? compare with key_window=0); 0: off
    key_window: int = 0
    # Length-generalization tasks (relpos.tasks): a task run (task != lm) is tested at
    # task_multiples x train.length on task_examples sequences per length; passkey=true
    # adds passkey retrieval to an LM's evaluation (task=lm, no task training) at the
    # eval.multiples / eval.lengths lengths its prompt fits.
    task_multiples: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    task_examples: int = 500
    passkey: bool = False


@dataclass
class TrainConfig:
    bias: dict[str, Any] = field(default_factory=lambda: {"name": "none"})
    # lm (the corpus LM) or a length-generalization task and its options (relpos.tasks)
    task: dict[str, Any] = field(default_factory=lambda: {"name": "lm"})
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    eval: EvalSection = field(default_factory=EvalSection, metadata=FREE)
    seed: int = 0
    experiment: str = field(default="default", metadata=FREE)
    label: str | None = field(default=None, metadata=FREE)  # legend label (default: scheme)


@dataclass
class EvalConfig:
    run_dir: str = "???"
    eval: EvalSection = field(default_factory=EvalSection)
    # Eval-time overrides of position-scheme options (e.g. rope interpolation).
    bias_overrides: dict[str, Any] = field(default_factory=dict)
    output: str = "eval_results.json"  # relative to run_dir
    label: str | None = None  # the results' label in plots (default: the run's own)


def resume_keys(schema=TrainConfig, prefix: str = "") -> list[str]:
    """The dotted config keys that must match when a run resumes: every field of the
    schema not marked :data:`FREE` (``bias`` whole: any option of the scheme)."""
    keys = []
    for f in dataclasses.fields(schema):
        if f.metadata.get("resume") == "free":
            continue
        kind = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(kind):
            keys += resume_keys(type(kind), f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


# The default position learning-rate scale per scheme (others: 1), measured on the quick
# setting (tiny LM, L = 64, 800 steps, lr 3e-3, seed 0; perplexity at 1x, nonoverlap,
# 65,536 targets; experiments/extrapolation/README.md, "Training the tables"):
#   offset: x1 6.83, x3 5.28, x10 4.90, x30 4.82  (largest row move 1.2 -> 4.4 -> 5.4 logits)
#   t5:     x1 6.61, x3 5.18, x10 4.89, x30 4.84  (max_distance 128 here; 6.60 / 4.86 at L/2)
#   fire:   x1 5.20, x10 5.11 at 1x but 6.37 -> 7.36 at 32x (an MLP, not a table; stays 1)
#   learned_abs: x1 6.14, x10 7.37 (worse: an embedding table, not logits; stays 1)
# A bias-table entry is a logit (|b| up to ~5), while Adam moves any parameter by ~lr per
# step (800 steps x 3e-3 sum to ~1.3 with the schedule): at x1 the tables cannot reach
# the values they want. T5's own code path multiplies nothing; the KERPLE reference code
# multiplies its T5 bias by sqrt(head_dim), the same effect under Adam as this scale.
POSITION_LR_SCALE = {"offset": 10.0, "t5": 10.0}


def position_lr_scale(name: str) -> float:
    """The default ``optim.position_lr_scale`` of scheme ``name`` (see POSITION_LR_SCALE)."""
    return POSITION_LR_SCALE.get(str(name), 1.0)


def t5_max_distance(train_length: int, num_buckets: int) -> int:
    """T5's default max_distance: half the training length, at least one more than the
    exact buckets (configs/bias/t5.yaml says why)."""
    return max(int(train_length) // 2, int(num_buckets) // 2 + 1)


def scheme_slug(name: str) -> str:
    """A scheme name fit for a folder name: an import path's last part
    (``my_pkg.biases:GaussianBias`` -> ``GaussianBias``)."""
    return name.replace(":", ".").rsplit(".", 1)[-1]


NAME_MAX = 255  # bytes in one path component on Linux and macOS file systems


def sweep_subdir(name: str) -> str:
    """A sweep job's folder name from its overrides (Hydra's ``override_dirname``), kept
    within one path component: a name longer than NAME_MAX bytes is cut and ends in
    ``~`` and 12 hex digits of its SHA-1, so distinct jobs keep distinct folders (the
    full overrides are in the job's ``.hydra/overrides.yaml``)."""
    raw = name.encode()
    if len(raw) <= NAME_MAX:
        return name
    digest = hashlib.sha1(raw).hexdigest()[:12]
    head = raw[:NAME_MAX - len(digest) - 1].decode(errors="ignore")
    return f"{head}~{digest}"


def register_schemas() -> None:
    if not OmegaConf.has_resolver("relpos.sweep_subdir"):
        OmegaConf.register_new_resolver("relpos.sweep_subdir", sweep_subdir)
    if not OmegaConf.has_resolver("relpos.scheme_slug"):
        OmegaConf.register_new_resolver("relpos.scheme_slug", scheme_slug)
    if not OmegaConf.has_resolver("relpos.position_lr_scale"):
        OmegaConf.register_new_resolver("relpos.position_lr_scale", position_lr_scale)
    if not OmegaConf.has_resolver("relpos.t5_max_distance"):
        OmegaConf.register_new_resolver("relpos.t5_max_distance", t5_max_distance)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="eval_schema", node=EvalConfig)
    # Every scheme's options with its constructor defaults (written once, there), as
    # `scheme_defaults/<name>`: the shipped bias/<name>.yaml files start from it. A scheme
    # with no YAML file of its own (an entry point, a registered plug-in) gets
    # `bias/<name>` too, so `bias=<name>` selects it.
    shipped = {p.stem for p in (Path(config_dir()) / "bias").glob("*.yaml")}
    for name in positions.available():
        defaults = scheme_defaults(name)
        cs.store(group="scheme_defaults", name=name, node=defaults)
        if name not in shipped:
            cs.store(group="bias", name=name, node={"name": name, **defaults})
    for name in tasks.available():  # configs/task/<name>.yaml start from these
        cs.store(group="task_defaults", name=name, node=tasks.defaults(name))


def scheme_defaults(name: str) -> dict[str, Any]:
    """A scheme's options with their constructor defaults (those without one omitted)."""
    params = inspect.signature(positions.lookup(name).__init__).parameters
    out = {}
    for key in positions.options_of(positions.lookup(name)):
        default = params[key].default
        if default is not inspect.Parameter.empty and isinstance(
                default, (int, float, str, bool, type(None))):
            out[key] = default
    return out


# ----------------------------------------------------------------------------- building


def plain(x):
    """A config node (or dataclass) as plain Python containers, resolved."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = OmegaConf.structured(x)
    return OmegaConf.to_container(x, resolve=True) if OmegaConf.is_config(x) else x


def check_choices(cfg, schema=None, prefix: str = "") -> None:
    """Every :func:`choice` field of ``cfg`` holds one of its options; else one
    :class:`RelposConfigError` naming the key and the valid values."""
    schema = schema or TrainConfig
    for f in dataclasses.fields(schema):
        value = getattr(cfg, f.name, None)
        options = f.metadata.get("choices")
        if options is not None:
            check_choice(f"{prefix}{f.name}", value, options)
        kind = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(kind) and value is not None:
            check_choices(value, type(kind), f"{prefix}{f.name}.")


def bias_options(bias_cfg) -> tuple[str, dict]:
    """``(scheme name, options)`` of a ``bias`` config node."""
    opts = dict(plain(bias_cfg))
    name = opts.pop("name", None)
    if not name:
        raise RelposError("bias.name is missing (choose bias=<scheme>)")
    return name, opts


def model_config(model_cfg, vocab_size: int) -> ModelConfig:
    """The model section of a config (node or dataclass) as a :class:`ModelConfig`;
    ``vocab_size``: the tokenizer's, unless the section sets one."""
    d = plain(model_cfg)
    kw = {f.name: d[f.name] for f in dataclasses.fields(ModelConfig) if f.name in d}
    kw["vocab_size"] = d.get("vocab_size") or vocab_size
    return ModelConfig(**kw)


def build_model(cfg, vocab_size: int) -> TransformerLM:
    name, opts = bias_options(cfg.bias)
    return TransformerLM(model_config(cfg.model, vocab_size), name, opts,
                         rngs=nnx.Rngs(params=cfg.seed))


# Task options added after runs were saved, with the value that reproduces those runs.
TASK_OPTIONS_BEFORE = {"assoc_recall": {"queries": "each"}}


def load_saved_config(path: Path):
    """A run's saved ``relpos_config.yaml``. A key added to the schema after the run was
    saved reads as its default (every such key's default keeps the earlier behaviour,
    e.g. ``optim.position_lr_scale: 1.0``); a key the schema no longer has is kept as
    saved. A task option added later reads as the value that keeps the saved run's
    format (:data:`TASK_OPTIONS_BEFORE`), not as the option's current default."""
    saved = OmegaConf.load(path)
    task = saved.get("task") or {}
    for key, value in TASK_OPTIONS_BEFORE.get(task.get("name"), {}).items():
        if key not in task:
            saved.task[key] = value
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    except OmegaConfBaseException:
        return saved
