"""Training loop: optax AdamW, jit-compiled step, orbax checkpoints, resume, logging.

State between steps is a pure pytree ``(params, opt_state, guard)``; the model's graph
definition is closed over by the step function (NNX split/merge style), so no Python
graph walk happens per step and the host syncs only at log steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from relpos import data as data_lib
from relpos import evaluate as eval_lib
from relpos.config import TrainConfig
from relpos.errors import RelposError
from relpos.io import atomic_write_json, atomic_write_text
from relpos.model import TransformerLM, count_params
from relpos.positions import lookup as lookup_scheme
from relpos.positions.base import (
    PositionTable,
    check_choice,
    check_positive_float,
    check_positive_int,
)

log = logging.getLogger(__name__)

# Config keys whose change makes a checkpoint meaningless or the comparison unfair.
RESUME_KEYS = ("bias", "model", "data.source", "data.name", "data.paths", "data.tokenizer",
               "data.bpe_vocab_size", "data.val_fraction", "data.max_documents", "data.hub",
               "train.length", "train.batch_size",
               "train.steps", "train.randomized_positions", "optim", "seed")
# How attention is computed, not what: a run may resume with another implementation.
RESUME_FREE = frozenset({"model.attn_impl", "model.block_size", "model.dense_max_len"})


class Preempted(Exception):
    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step = signum, step
        # The default hydra.run.dir holds a timestamp, so "the same command" alone would
        # start a new run: name the directory to resume in.
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; "
                         f"checkpoint saved in {run_dir}; to resume, rerun the same command "
                         f"with hydra.run.dir={run_dir}")


# ----------------------------------------------------------------------------- building


def bias_options(bias_cfg) -> tuple[str, dict]:
    opts = OmegaConf.to_container(bias_cfg, resolve=True) if not isinstance(bias_cfg, dict) \
        else dict(bias_cfg)
    name = opts.pop("name", None)
    if not name:
        raise RelposError("bias.name is missing (choose bias=<scheme>)")
    return name, opts


def build_model(cfg, vocab_size: int) -> TransformerLM:
    name, opts = bias_options(cfg.bias)
    return TransformerLM(model_config(cfg.model, vocab_size), name, opts,
                         rngs=nnx.Rngs(params=cfg.seed))


def model_config(model_cfg, vocab_size: int):
    """The model section of a config (DictConfig or dataclass) as a ModelConfig."""
    from relpos.config import ModelSection

    d = OmegaConf.to_container(model_cfg) if OmegaConf.is_config(model_cfg) \
        else dataclasses.asdict(model_cfg)
    return ModelSection(**d).to_model_config(vocab_size)


def decay_mask(params, decay_tables: bool):
    """Weight decay on matrices only (not norms, biases, scalars), and on position
    tables only when asked (see OptimSection.decay_position_tables)."""

    def want(v):
        if isinstance(v, PositionTable):
            return decay_tables
        return v.value.ndim >= 2

    return jax.tree.map(want, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def position_mask(params):
    """True for the position scheme's parameters (the model's ``position`` and
    ``layer_positions`` modules), False for the rest."""
    def owner(path, _):
        return getattr(path[0], "key", None) in ("position", "layer_positions")

    return jax.tree_util.tree_map_with_path(owner, params)


def make_optimizer(ocfg, steps: int, params) -> tuple[optax.GradientTransformation, Any]:
    warmup = min(ocfg.warmup_steps, max(steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=ocfg.lr, warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1), end_value=ocfg.lr * ocfg.min_lr_ratio)
    parts = [
        optax.clip_by_global_norm(ocfg.clip_norm),
        optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                    weight_decay=ocfg.weight_decay,
                    mask=decay_mask(params, ocfg.decay_position_tables)),
    ]
    scale = ocfg.position_lr_scale
    if scale != 1.0:  # Adam's update is ~lr per step: scaling it scales the lr
        parts.append(optax.masked(optax.scale(scale), position_mask(params)))
    return optax.chain(*parts), schedule


def lm_loss(model, tokens, positions):
    """Mean next-token NLL over ``tokens[:, :-1] -> tokens[:, 1:]``."""
    logits = model(tokens[:, :-1], positions)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def train_step_fn(graphdef, tx):
    """Pure step ``(params, opt_state, guard, tokens, positions, step) -> (..., metrics)``.

    A non-finite loss or gradient norm never reaches the parameters: the update is
    dropped and ``guard`` records the first such step and which metric it was
    (1: loss, 2: grad_norm), plus how many steps were skipped.
    """

    def step_fn(params, opt_state, guard, tokens, positions, step):
        loss, grads = jax.value_and_grad(
            lambda p: lm_loss(nnx.merge(graphdef, p), tokens, positions))(params)
        gnorm = optax.global_norm(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_params, new_opt = keep(new_params, params), keep(new_opt, opt_state)
        what = jnp.where(jnp.isfinite(loss), 2, 1)
        first = guard["bad_step"] < 0
        guard = {
            "bad_step": jnp.where(~ok & first, step, guard["bad_step"]),
            "bad_what": jnp.where(~ok & first, what, guard["bad_what"]),
            "skipped": guard["skipped"] + (~ok).astype(jnp.int32),
        }
        return new_params, new_opt, guard, {"loss": loss, "grad_norm": gnorm}

    return step_fn


def multi_step_fn(graphdef, tx):
    """``n`` consecutive steps in one call: ``tokens [n, B, T+1]``, ``positions`` shared
    ``[T]`` or per step ``[n, B, T]``, first step index ``step``; the metrics come back
    stacked ``[n]``. Same result as ``n`` calls of :func:`train_step_fn` (a ``lax.scan``
    over it); on CPU it saves XLA's per-call allocation of its temp buffer, whose fresh
    pages the kernel must fault in and zero on every call under glibc malloc."""
    step_fn = train_step_fn(graphdef, tx)

    def multi(params, opt_state, guard, tokens, positions, step):
        per_step_pos = positions.ndim == tokens.ndim

        def body(carry, xs):
            tok, pos, i = xs
            *carry, m = step_fn(*carry, tok, positions if pos is None else pos, step + i)
            return tuple(carry), m

        steps = jnp.arange(tokens.shape[0], dtype=jnp.int32)
        xs = (tokens, positions if per_step_pos else None, steps)
        carry, metrics = jax.lax.scan(body, (params, opt_state, guard), xs)
        return (*carry, metrics)

    return multi


def pure_step(graphdef, tx, *, multi: bool = False):
    """:func:`train_step_fn`, or with ``multi`` :func:`multi_step_fn` (not yet jitted)."""
    return (multi_step_fn if multi else train_step_fn)(graphdef, tx)


def make_train_step(graphdef, tx, *, multi: bool = False):
    """The jitted :func:`pure_step`; the state (params, optimiser state, guard) is
    donated."""
    return jax.jit(pure_step(graphdef, tx, multi=multi), donate_argnums=(0, 1, 2))


def fresh_guard():
    return {"bad_step": jnp.int32(-1), "bad_what": jnp.int32(0), "skipped": jnp.int32(0)}


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints:
    """Orbax CheckpointManager over ``{params, opt_state, guard}`` + JSON metadata.

    Orbax writes each step to a temporary folder and renames it when complete, so a
    crash mid-save leaves the previous step intact; :meth:`restore_latest` falls back
    to older steps if the newest cannot be read.
    """

    def __init__(self, directory: Path, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.mgr = ocp.CheckpointManager(
            directory.resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
        )

    def save(self, step: int, state: dict, meta: dict) -> None:
        ocp = self.ocp
        self.mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        self.mgr.wait_until_finished()

    def restore_latest(self, abstract_state: dict, *, set_aside: bool = False
                       ) -> tuple[int, dict, dict] | None:
        """The newest readable step as ``(step, state, meta)``, or None if there is none.

        ``set_aside``: rename unreadable newer steps to ``<step>.unreadable`` (kept for
        inspection), since training will save those step numbers again.
        """
        ocp = self.ocp
        errors, bad_steps = [], []
        for step in sorted(self.mgr.all_steps(), reverse=True):
            try:
                out = self.mgr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 - corrupt or partial step: try an older one
                errors.append(f"{step} ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                              if str(e) else f"{step} ({type(e).__name__})")
                bad_steps.append(step)
                continue
            if errors:
                log.warning("checkpoint(s) %s unreadable; using step %d", "; ".join(errors), step)
                if set_aside:
                    self._set_aside(bad_steps)
            return step, out["state"], out["meta"]
        if errors:
            raise RelposError(f"no readable checkpoint in {self.mgr.directory}: tried steps "
                              f"{', '.join(errors)}; delete the folder to start over")
        return None

    def _set_aside(self, steps) -> None:
        root = Path(self.mgr.directory)
        for step in steps:
            target = root / f"{step}.unreadable"
            n = 1
            while target.exists():
                target, n = root / f"{step}.unreadable{n}", n + 1
            (root / str(step)).rename(target)
            log.warning("moved unreadable checkpoint %s aside to %s", step, target)
        self.mgr.reload()

    def close(self):
        self.mgr.close()


# ----------------------------------------------------------------------------- run


def check_train_config(cfg) -> None:
    t = cfg.train
    for key in ("length", "steps", "batch_size", "log_every", "checkpoint_every",
                "keep_checkpoints"):
        check_positive_int(f"train.{key}", getattr(t, key))
    check_positive_int("train.eval_every", t.eval_every, minimum=0)
    k = t.steps_per_call
    if k is not None:
        check_positive_int("train.steps_per_call", k)
        every = _host_intervals(t)
        bad = [f"train.{name}={v}" for name, v in every.items() if v % k]
        if bad:  # a call may not run past a step where the host logs, saves or evaluates
            g = math.gcd(*every.values())
            fits = [d for d in range(2, min(g, 64) + 1) if g % d == 0]
            raise RelposError(
                f"train.steps_per_call={k} must divide {', '.join(bad)}; choose "
                f"{'one of ' + ', '.join(map(str, fits)) if fits else '1'}, or null (auto)")
    check_choice("train.on_nonfinite", t.on_nonfinite, ("error", "skip"))
    check_choice("train.parallel", t.parallel, ("none", "data", "fsdp"))
    if t.randomized_positions and t.randomized_positions < t.length:
        raise RelposError(f"train.randomized_positions={t.randomized_positions} must be 0 "
                          f"(off) or >= train.length={t.length}")
    eval_lib.check_eval_config(cfg.eval)
    name, _ = bias_options(cfg.bias)
    try:
        lookup_scheme(name)  # before loading the corpus: an unknown name fails now
    except ValueError as e:
        raise RelposError(str(e)) from None
    model_config(cfg.model, cfg.model.vocab_size or 1).validate()  # vocab: tokenizer's, later
    check_positive_float("optim.lr", cfg.optim.lr)
    check_positive_float("optim.position_lr_scale", cfg.optim.position_lr_scale)


# Up to 25: XLA:CPU faults its temporary buffer in afresh on every call (`small`: 18.4k
# page faults a step at 10 per call, 7.2k at 25; median step 461 vs 449 ms, 447 at 50;
# benchmarks/README.md). More would delay the answer to a preemption signal, which is
# honoured between calls, for little gain.
AUTO_STEPS_PER_CALL = 25


def _host_intervals(t) -> dict[str, int]:
    """The step intervals at which the host logs, saves and evaluates."""
    every = {"log_every": t.log_every, "checkpoint_every": t.checkpoint_every}
    if t.eval_every:
        every["eval_every"] = t.eval_every
    return every


def steps_per_call(t, backend: str | None = None) -> int:
    """``train.steps_per_call``, or for null (auto) on CPU the largest number up to
    :data:`AUTO_STEPS_PER_CALL` that divides every host interval (so no call runs past
    a log, checkpoint or evaluation step; log_every 50 and checkpoint_every 200 -> 25),
    and 1 on other backends: on an H100 the trainer ran 0.70x as fast at 10 per call
    (benchmarks/README.md), though relpos-bench's step alone gains 1-8% there."""
    if t.steps_per_call is not None:
        return t.steps_per_call
    if (backend or jax.default_backend()) != "cpu":
        return 1
    g = math.gcd(*_host_intervals(t).values())
    return max(d for d in range(1, AUTO_STEPS_PER_CALL + 1) if g % d == 0)


def default_label(scheme: str, optim) -> str:
    """A run's label in plots when ``label`` is unset: the scheme, plus the position
    learning-rate scale when it is not 1 (plots group runs by label)."""
    k = optim.position_lr_scale
    return scheme if k == 1 else f"{scheme} (position lr x{k:g})"


def load_saved_config(path: Path):
    """A run's saved ``relpos_config.yaml``. A key added to the schema after the run was
    saved reads as its default (every such key's default keeps the earlier behaviour,
    e.g. ``optim.position_lr_scale: 1.0``); a key the schema no longer has is kept as
    saved."""
    saved = OmegaConf.load(path)
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), saved)
    except OmegaConfBaseException:
        return saved


def _select(cfg, dotted: str):
    return OmegaConf.select(cfg, dotted)


def check_resume_compatible(run_dir: Path, cfg) -> None:
    saved_path = run_dir / "relpos_config.yaml"
    ckpt_dir = run_dir / "checkpoints"
    if not saved_path.exists() or not (
            ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
        return  # nothing to resume (e.g. an earlier attempt stopped at a start-up check)
    saved = load_saved_config(saved_path)
    # The saved config is resolved (offset size: ${train.length} -> 128): compare alike.
    current = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    diff = []
    for key in RESUME_KEYS:
        a, b = _select(saved, key), _select(current, key)
        a = OmegaConf.to_container(a) if OmegaConf.is_config(a) else a
        b = OmegaConf.to_container(b) if OmegaConf.is_config(b) else b
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                diff += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            else:
                diff.append(key)
    diff = [k for k in diff if k not in RESUME_FREE]
    if diff:
        raise RelposError(
            f"run directory {run_dir} holds a run with a different configuration "
            f"({', '.join(diff)}); use a new hydra.run.dir or restore those values")


class _SignalFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. some launchers): leave as is
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg, run_dir: Path) -> dict[str, Any]:
    """Train (resuming if ``run_dir`` has a checkpoint), evaluate, write results.json."""
    with contextlib.ExitStack() as closing:  # checkpointer, logs, progress bar: any exit
        return _train(cfg, run_dir, closing)


def _train(cfg, run_dir: Path, closing: contextlib.ExitStack) -> dict[str, Any]:
    from relpos.logging_utils import MetricLogger

    check_train_config(cfg)
    if cfg.train.distributed:  # multi-host: before any JAX computation (SLURM env is read)
        jax.distributed.initialize()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise RelposError(f"output directory is not writable: {run_dir}")
    check_resume_compatible(run_dir, cfg)
    atomic_write_text(run_dir / "relpos_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    corpus = data_lib.load_corpus(cfg.data)
    t = cfg.train
    eval_lib.check_lengths_fit(cfg.eval, t.length, corpus.val.size)
    model = build_model(cfg, corpus.vocab_size)
    eval_lib.check_positions_reach(
        model, max(eval_lib.eval_lengths(cfg.eval, t.length) + [t.randomized_positions]))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = count_params(model)
    tx, schedule = make_optimizer(cfg.optim, t.steps, params)
    opt_state = tx.init(params)
    guard = fresh_guard()
    per_call = steps_per_call(t)
    multi = per_call > 1
    step_fn = make_train_step(graphdef, tx, multi=multi)  # on_nonfinite: on the host

    ckpt = Checkpoints(run_dir / "checkpoints", t.keep_checkpoints)
    closing.callback(ckpt.close)
    start, train_seconds = 0, 0.0
    restored = ckpt.restore_latest({"params": params, "opt_state": opt_state, "guard": guard},
                                   set_aside=True)
    if restored is not None:
        start, state, meta = restored
        params, opt_state, guard = state["params"], state["opt_state"], state["guard"]
        train_seconds = meta.get("train_seconds", 0.0)
        log.info("resumed from step %d in %s", start, run_dir)
    place = None
    if t.parallel != "none":  # data parallel / FSDP over every visible device
        from relpos import parallel as par

        mesh = par.data_mesh()
        par.check_batch(mesh, t.batch_size)
        fsdp = t.parallel == "fsdp"
        step_fn = par.make_parallel_train_step(graphdef, tx, mesh, params, opt_state, fsdp=fsdp,
                                               batched_positions=bool(t.randomized_positions),
                                               multi=multi)
        params, opt_state, guard = par.place_state(mesh, (params, opt_state, guard), fsdp=fsdp)
        place = lambda tokens, pos: par.place_batch(mesh, tokens, pos, stacked=multi)  # noqa: E731
        log.info("%s over %d devices", t.parallel, mesh.size)

    name, opts = bias_options(cfg.bias)
    log.info("model: %s, %d parameters, bias=%s, %d steps per call", cfg.model.preset,
             n_params, name, per_call)
    metrics = closing.enter_context(contextlib.closing(
        MetricLogger(run_dir, hparams=_hparams(cfg), enable_tb=True)))
    fixed_positions = jnp.arange(t.length, dtype=jnp.int32)  # on device once

    def batch_at(step):
        tokens = data_lib.train_batch(corpus.train, seed=cfg.seed, step=step,
                                      batch_size=t.batch_size, length=t.length)
        if t.randomized_positions:
            return tokens, data_lib.random_positions(
                seed=cfg.seed, step=step, batch_size=t.batch_size, length=t.length,
                max_position=t.randomized_positions)
        return tokens, fixed_positions

    def batches(step, n):
        """``n`` steps' batches stacked for the multi-step call (shared positions once)."""
        tokens, pos = zip(*(batch_at(s) for s in range(step, step + n)))
        return np.stack(tokens), (np.stack(pos) if t.randomized_positions else fixed_positions)

    def next_stop(step):
        """The next step after ``step`` at which the host logs, saves, evaluates or ends."""
        return min([t.steps] + [(step // e + 1) * e for e in _host_intervals(t).values()])

    def save(step):
        ckpt.save(step, {"params": params, "opt_state": opt_state, "guard": guard},
                  {"step": step, "train_seconds": train_seconds})

    progress = closing.enter_context(contextlib.closing(_progress(t, start)))
    tokens_per_step = t.batch_size * t.length
    steady_tokens, steady_seconds = 0, 0.0
    last_log_time, last_log_step = None, start
    seen_shapes = set()  # tokens shapes compiled so far ([B, T+1] or [n, B, T+1])
    step = start
    with _SignalFlag() as sig:
        while step < t.steps:
            n = min(per_call, next_stop(step) - step)
            tokens, pos = batches(step, n) if multi else batch_at(step)
            if place is not None:
                tokens, pos = place(tokens, pos)
            t0 = time.perf_counter()
            params, opt_state, guard, m = step_fn(  # dispatch is asynchronous
                params, opt_state, guard, tokens, pos, jnp.int32(step))
            if tokens.shape not in seen_shapes:  # this call compiled a new call length
                seen_shapes.add(tokens.shape)  # (the first, the tail, after a resume)
                if last_log_time is not None:
                    last_log_time += time.perf_counter() - t0  # compiling is not training
            step += n
            progress.update(n)
            at_ckpt = step % t.checkpoint_every == 0 or step == t.steps
            if step % t.log_every == 0 or at_ckpt or sig.signum is not None:
                loss = last_metric(m["loss"])  # host sync; the metrics of the call's last step
                now = time.perf_counter()
                if last_log_time is None:  # first sync after (re)start includes compile
                    train_seconds_delta = 0.0
                else:
                    train_seconds_delta = now - last_log_time
                    steady_tokens += (step - last_log_step) * tokens_per_step
                    steady_seconds += train_seconds_delta
                train_seconds += train_seconds_delta
                tok_s = (step - last_log_step) * tokens_per_step / train_seconds_delta \
                    if train_seconds_delta else float("nan")
                last_log_time, last_log_step = now, step
                _check_guard(guard, t.on_nonfinite, step)
                skipped = int(guard["skipped"])
                row = {"step": step, "loss": loss, "grad_norm": last_metric(m["grad_norm"]),
                       # skipped steps leave the optimiser's count (and so the lr) behind
                       "lr": float(schedule(step - 1 - skipped)), "tokens_per_second": tok_s,
                       "skipped_steps": skipped}
                metrics.scalars(row, step)
                progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
            if sig.signum is not None:
                save(step)
                raise Preempted(sig.signum, step, run_dir)
            paused = at_ckpt
            if at_ckpt:
                save(step)
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                paused = True
                val = eval_lib.quick_val_loss(nnx.merge(graphdef, params), corpus.val, t.length,
                                              cfg.eval)
                metrics.scalars({"val_loss": val}, step)
            if paused and last_log_time is not None:
                last_log_time = time.perf_counter()  # checkpoints and evals are not training
    progress.close()

    model = nnx.merge(graphdef, params)
    results = {
        "bias": name, "train_length": t.length, "seed": cfg.seed,
        "tokenizer": corpus.tokenizer, "dataset": corpus.name,
        "dataset_fingerprint": corpus.fingerprint, "params": n_params,
        "model": OmegaConf.to_container(cfg.model), "experiment": cfg.experiment,
        "label": cfg.label or default_label(name, cfg.optim),
        "bias_options": opts,
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "bias_convention": "inside_scale" if cfg.model.bias_inside_scale else "after_scale",
        "train_steps": t.steps, "train_tokens": t.steps * tokens_per_step,
        "train_seconds": round(train_seconds, 3),
        "train_tokens_per_second": (steady_tokens / steady_seconds) if steady_seconds else None,
        "final_train_loss": _last_loss(run_dir),
        "skipped_steps": int(guard["skipped"]),
        "backend": jax.default_backend(),
    }
    results["eval"] = eval_lib.evaluate(model, corpus.val, train_length=t.length, ecfg=cfg.eval)
    eval_lib.save_bias_profile(model, run_dir / "bias_profile.json", train_length=t.length,
                               max_length=max(e["length"] for e in results["eval"]))
    for e in results["eval"]:
        metrics.scalars({f"eval_{e['mode']}/ppl_L{e['length']}": e["ppl"]}, t.steps)
    metrics.bias_figure(run_dir / "bias_profile.json", t.steps)
    metrics.final(results)
    atomic_write_json(run_dir / "results.json", results)
    return results


def last_metric(x) -> float:
    """The last value of a metric: a scalar, or ``[n]`` from an n-step call."""
    return float(np.asarray(x).reshape(-1)[-1])


def _check_guard(guard, policy: str, step: int) -> None:
    bad = int(guard["bad_step"])
    if bad >= 0 and policy == "error":
        what = {1: "loss", 2: "grad_norm"}[int(guard["bad_what"])]
        raise RelposError(
            f"non-finite {what} at step {bad + 1}; training stopped, the last good checkpoint "
            "is kept (lower optim.lr, or train.on_nonfinite=skip to skip such steps)")


def _last_loss(run_dir: Path):
    path = run_dir / "metrics.jsonl"
    last = None
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in row:
                last = row["loss"]
    return last


def _hparams(cfg) -> dict:
    name, opts = bias_options(cfg.bias)
    flat = {"bias": name, "seed": cfg.seed, "train_length": cfg.train.length,
            "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "lr": cfg.optim.lr}
    flat.update({f"model.{k}": v for k, v in OmegaConf.to_container(cfg.model).items()
                 if isinstance(v, (int, float, str, bool))})
    flat.update({f"bias.{k}": v for k, v in opts.items() if isinstance(v, (int, float, str, bool))})
    return flat


def _progress(t, start):
    from tqdm.auto import tqdm

    return tqdm(total=t.steps, initial=start, disable=not t.progress, desc="train",
                unit="step", dynamic_ncols=True, mininterval=1.0)

