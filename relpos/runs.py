"""The two jobs behind the commands: train a run (``relpos-train``) and re-evaluate one
(``relpos-eval``). Each wires the library together: corpus, model, step, the training
loop and its hooks, evaluation, and the files of the run directory."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from relpos import data as data_lib
from relpos import evaluation
from relpos import tasks as tasks_lib
from relpos.config import (
    bias_options,
    build_model,
    check_choices,
    load_saved_config,
    model_config,
    plain,
    position_lr_scale,
    resume_keys,
)
from relpos.errors import RelposError, check_positive_float, check_positive_int
from relpos.io import atomic_write_json, atomic_write_text
from relpos.nn import count_params
from relpos.positions import lookup as lookup_scheme
from relpos.training import distributed as dist
from relpos.training import parallel as par
from relpos.training.checkpoint import Checkpoints, has_checkpoint
from relpos.training.loop import (
    Preempted,
    StepInfo,
    Trainer,
    TrainState,
    check_guard,
    tokens_per_second,
)
from relpos.training.metrics import MetricLogger
from relpos.training.step import (
    WeightedTokens,
    fresh_guard,
    last_metric,
    make_optimizer,
    make_train_step,
)

log = logging.getLogger(__name__)

# Up to 25: XLA:CPU faults its temporary buffer in afresh on every call (`small`: 18.4k
# page faults a step at 10 per call, 7.2k at 25; median step 461 vs 449 ms, 447 at 50;
# benchmarks/README.md). More would delay the answer to a preemption signal, which is
# honoured between calls, for little gain.
AUTO_STEPS_PER_CALL = 25


def notify(message: str) -> None:
    """A line for the console (whose log level shows warnings only) and train.log."""
    log.info(message)
    tqdm.write(message, file=sys.stderr)


# ----------------------------------------------------------------------------- checks


def check_train_config(cfg) -> None:
    check_choices(cfg)
    t = cfg.train
    for key in ("length", "steps", "batch_size", "log_every", "checkpoint_every",
                "keep_checkpoints"):
        check_positive_int(f"train.{key}", getattr(t, key))
    check_positive_int("train.eval_every", t.eval_every, minimum=0)
    k = t.steps_per_call
    if k is not None:
        check_positive_int("train.steps_per_call", k)
        every = host_intervals(t)
        bad = [f"train.{name}={v}" for name, v in every.items() if v % k]
        if bad:  # a call may not run past a step where the host logs, saves or evaluates
            g = math.gcd(*every.values())
            fits = [d for d in range(2, min(g, 64) + 1) if g % d == 0]
            raise RelposError(
                f"train.steps_per_call={k} must divide {', '.join(bad)}; choose "
                f"{'one of ' + ', '.join(map(str, fits)) if fits else '1'}, or null (auto)")
    check_positive_int("train.prefetch", t.prefetch, minimum=0)
    if t.loader == "device" and task_of(cfg) is not None:
        raise RelposError(f"train.loader=device needs the corpus LM (task=lm); task "
                          f"{task_of(cfg).name} builds its batches on the host: use "
                          "train.loader=auto or host")
    if t.randomized_positions and t.randomized_positions < t.length:
        raise RelposError(f"train.randomized_positions={t.randomized_positions} must be 0 "
                          f"(off) or >= train.length={t.length}")
    evaluation.check_eval_config(cfg.eval)
    name, _ = bias_options(cfg.bias)
    try:
        lookup_scheme(name)  # before loading the corpus: an unknown name fails now
    except ValueError as e:
        raise RelposError(str(e)) from None
    model_config(cfg.model, cfg.model.vocab_size or 1).validate()  # vocab: tokenizer's, later
    check_positive_float("optim.lr", cfg.optim.lr)
    check_positive_float("optim.position_lr_scale", cfg.optim.position_lr_scale)
    check_task_config(cfg)


def host_intervals(t) -> dict[str, int]:
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
    g = math.gcd(*host_intervals(t).values())
    return max(d for d in range(1, AUTO_STEPS_PER_CALL + 1) if g % d == 0)


def default_label(scheme: str, optim) -> str:
    """A run's label in plots when ``label`` is unset: the scheme, plus the position
    learning-rate scale when it is not the scheme's default
    (:func:`relpos.config.position_lr_scale`)."""
    k = optim.position_lr_scale
    return scheme if k == position_lr_scale(scheme) else f"{scheme} (position lr x{k:g})"


def check_resume_compatible(run_dir: Path, cfg) -> None:
    """Refuse a run directory whose saved run differs in a key that must match
    (:func:`relpos.config.resume_keys`), naming the keys."""
    saved_path = run_dir / "relpos_config.yaml"
    if not saved_path.exists() or not has_checkpoint(run_dir / "checkpoints"):
        return  # nothing to resume (e.g. an earlier attempt stopped at a start-up check)
    saved = plain(load_saved_config(saved_path))
    current = plain(cfg)  # the saved config is resolved (offset size: ${train.length})
    diff = []
    for key in resume_keys():
        a, b = _select(saved, key), _select(current, key)
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                diff += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            else:
                diff.append(key)
    if diff:
        raise RelposError(
            f"run directory {run_dir} holds a run with a different configuration "
            f"({', '.join(diff)}); use a new hydra.run.dir or restore those values")


def _select(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


# ----------------------------------------------------------------------------- training


def train(cfg, run_dir: Path) -> dict[str, Any]:
    """Train (resuming if ``run_dir`` has a checkpoint), evaluate, write results.json.

    A stop signal raises :class:`relpos.training.loop.Preempted` once the checkpoint of
    the current step is written; if a handler was installed for the signal before
    training (submitit's checkpoint-and-requeue, under its launchers), it runs once the
    run's files are closed, so the requeued job resumes from that step."""
    try:
        with contextlib.ExitStack() as closing:  # checkpointer, logs, progress bar: any exit
            return _train(cfg, run_dir, closing)
    except Preempted as e:
        if e.resubmit is not None:
            notify(f"{e}; handing over to the launcher's handler for "
                   f"{signal.Signals(e.signum).name} (requeue)")
            e.resubmit(e.signum)  # submitit: requeues the job and exits
        raise


def _prepare_run_dir(cfg, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(run_dir, os.W_OK):
        raise RelposError(f"output directory is not writable: {run_dir}")
    check_resume_compatible(run_dir, cfg)
    if dist.is_primary():
        atomic_write_text(run_dir / "relpos_config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    dist.barrier("relpos: run directory")  # every process sees the saved config


def _train(cfg, run_dir: Path, closing: contextlib.ExitStack) -> dict[str, Any]:
    check_train_config(cfg)
    if cfg.train.distributed:  # multi-process: before any JAX computation
        dist.initialize(cfg.train)
        log.info("process %d of %d, %d of %d devices here", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
        dist.check_same(str(run_dir.resolve()), "run directories")
    if cfg.train.parallel == "none" and jax.process_count() > 1:
        raise RelposError(f"train.distributed=true runs {jax.process_count()} processes "
                          "training one model: set train.parallel=data or fsdp")
    if cfg.train.parallel != "none":  # before the data: the global device count is known
        par.check_batch(par.data_mesh(), cfg.train.batch_size)
    primary = dist.is_primary()  # process 0 writes the run's files
    _prepare_run_dir(cfg, run_dir)
    task = task_of(cfg)  # None: the corpus LM
    corpus = load_data(cfg.data, task)
    t = cfg.train
    if task is None:
        evaluation.check_lengths_fit(cfg.eval, t.length, corpus.val.size)
    model = build_model(cfg, corpus.vocab_size)
    evaluation.check_positions_reach(
        model, max(test_lengths(cfg.eval, t.length, task) + [t.randomized_positions]))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = count_params(model)
    tx, schedule = make_optimizer(cfg.optim, t.steps, params)
    state = TrainState(params, tx.init(params), fresh_guard())
    per_call = steps_per_call(t)
    multi = per_call > 1
    loader = choose_loader(t, task, corpus.train)
    sample_length = t.length if loader == "device" else None
    mesh = None
    if t.parallel != "none":  # data parallel / FSDP over every device of every process
        mesh = par.data_mesh()
        par.check_batch(mesh, t.batch_size)
        fsdp = t.parallel == "fsdp"
        step_fn = par.make_parallel_train_step(graphdef, tx, mesh, state.params,
                                               state.opt_state, fsdp=fsdp,
                                               batched_positions=bool(t.randomized_positions),
                                               multi=multi, sample_length=sample_length)
        state.params, state.opt_state, state.guard = par.place_state(
            mesh, (state.params, state.opt_state, state.guard), fsdp=fsdp)
        log.info("%s over %d devices (%d processes)", t.parallel, mesh.size,
                 jax.process_count())
    else:
        step_fn = make_train_step(graphdef, tx, multi=multi, sample_length=sample_length)

    ckpt = Checkpoints(run_dir / "checkpoints", t.keep_checkpoints)
    closing.callback(ckpt.close)
    restored = ckpt.restore_latest(state.arrays, set_aside=True)  # in the placed layout
    if restored is not None:
        step, arrays, meta = restored
        state = TrainState(**arrays, step=step, train_seconds=meta.get("train_seconds", 0.0))
        notify(f"resumed from step {step} in {run_dir}")

    name, opts = bias_options(cfg.bias)
    log.info("model: %s, %d parameters, bias=%s, %d steps per call", cfg.model.preset,
             n_params, name, per_call)
    metrics = closing.enter_context(contextlib.closing(
        MetricLogger(run_dir, hparams=_hparams(cfg), enable_tb=True, enabled=primary)))
    log.info("training batches: %s", "windows gathered on the device from the token array"
             if loader == "device" else "built on the host in a prefetching thread")
    batches = call_inputs(cfg, corpus.train, multi, mesh, task_sampler(cfg, task, corpus.train),
                          on_device=loader == "device")
    progress = closing.enter_context(contextlib.closing(tqdm(
        total=t.steps, initial=state.step, disable=not (t.progress and primary), desc="train",
        unit="step",
        dynamic_ncols=True, mininterval=1.0)))
    agreement = dist.stop_agreement(mesh) if jax.process_count() > 1 else None
    trainer = Trainer(step_fn, batches, total_steps=t.steps, steps_per_call=per_call,
                      progress=progress, prefetch=t.prefetch, stop_agreement=agreement)
    tokens_per_step = t.batch_size * t.length
    last = {"loss": None, "steady_steps": 0, "steady_seconds": 0.0}  # at the last log row
    # the schedule's values at every step, computed once: a log row calls no JAX op
    lrs = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(t.steps + 1)))

    def log_row(info: StepInfo):  # reads the metrics only: runs while the next call computes
        check_guard(info.metrics, t.on_nonfinite, info.state.step)
        clock, step = info.clock, info.state.step
        skipped = int(np.asarray(info.metrics["skipped"]).reshape(-1)[-1])
        loss = last_metric(info.metrics["loss"])
        tok_s = tokens_per_second(
            (clock.steady_steps - last["steady_steps"]) * tokens_per_step,
            clock.steady_seconds - last["steady_seconds"])
        last.update(loss=loss, steady_steps=clock.steady_steps,
                    steady_seconds=clock.steady_seconds)
        row = {"step": step, "loss": loss, "grad_norm": last_metric(info.metrics["grad_norm"]),
               # skipped steps leave the optimiser's count (and so the lr) behind
               "lr": float(lrs[step - 1 - skipped]), "tokens_per_second": tok_s,
               "skipped_steps": skipped}
        metrics.scalars(row, step)
        progress.set_postfix(loss=f"{loss:.3f}",
                             tok_s="n/a" if tok_s is None else f"{tok_s:,.0f}")

    def save(info: StepInfo):
        if info.state.step % t.log_every and not (info.final or info.stopping):
            log_row(info)  # every checkpoint has its log row (the log hook ran otherwise)
        ckpt.save(info.state.step, info.state.arrays,
                  {"step": info.state.step, "train_seconds": info.state.train_seconds})

    def validate(info: StepInfo):
        local = nnx.merge(graphdef, dist.to_local(info.state.params))
        if task is not None:
            metrics.scalars(task_validation(local, task, corpus.val, t.length, cfg.eval),
                            info.state.step)
            return
        val = evaluation.quick_val_loss(local, corpus.val, t.length, cfg.eval)
        metrics.scalars({"val_loss": val}, info.state.step)

    trainer.add_hook(log_row, t.log_every, on_stop=True, state=False)
    trainer.add_hook(save, t.checkpoint_every, on_stop=True)
    trainer.add_hook(validate, t.eval_every, at_end=False)
    start = state.step
    state = trainer.run(state, stop_hint=(
        f"checkpoint saved in {run_dir}; to resume, rerun the same command with "
        f"{shlex.quote(f'hydra.run.dir={run_dir}')}"))  # the default run dir holds a timestamp
    progress.close()

    clock_tokens = last["steady_steps"] * tokens_per_step
    results = {
        "bias": name, "train_length": t.length, "seed": cfg.seed,
        "tokenizer": corpus.tokenizer, "dataset": corpus.name,
        "dataset_fingerprint": corpus.fingerprint, "params": n_params,
        "model": plain(cfg.model), "experiment": cfg.experiment,
        "label": cfg.label or default_label(name, cfg.optim),
        "bias_options": opts,
        "optim": plain(cfg.optim),
        "bias_convention": "inside_scale" if cfg.model.bias_inside_scale else "after_scale",
        "train_steps": t.steps, "train_tokens": t.steps * tokens_per_step,
        "train_seconds": round(state.train_seconds, 3),
        "train_tokens_per_second": tokens_per_second(clock_tokens, last["steady_seconds"]),
        "resumed_from_step": start or None,
        "final_train_loss": last["loss"],
        "skipped_steps": int(state.guard["skipped"]),
        "backend": jax.default_backend(),
    }
    if task is not None:
        results.update(task=task.name, task_options=task.options())
    model = nnx.merge(graphdef, dist.to_local(state.params))  # every process evaluates
    results["position_coverage"] = evaluation.table_coverage(
        model, build_model(cfg, corpus.vocab_size), train_length=t.length, train_steps=t.steps,
        randomized=bool(t.randomized_positions))
    results.update(evaluations(model, task, corpus, t.length, cfg.eval))
    if primary:
        profile = evaluation.save_bias_profile(
            model, run_dir / "bias_profile.json", train_length=t.length,
            max_length=max(e["length"] for e in results["eval"]))
        for e in results["eval"]:
            metrics.scalars(eval_scalars(e), t.steps)
        metrics.bias_figure(profile, t.steps)
        metrics.final(results)
        atomic_write_json(run_dir / "results.json", results)
    dist.barrier("relpos: results written")
    return results


# The largest training split kept on the device (train.loader=auto); beyond it (or
# beyond int32 indices) the windows are gathered on the host, in the prefetching thread.
DEVICE_CORPUS_MAX_BYTES = 2 << 30


def choose_loader(t, task, train_tokens) -> str:
    """``device`` (the token array on the device, windows gathered in the step) or
    ``host`` (batches built on the host): ``train.loader``, or for auto ``device`` for the
    corpus LM when its training split fits :data:`DEVICE_CORPUS_MAX_BYTES`. Tasks
    generate their batches on the host (:mod:`relpos.tasks`)."""
    fits = (train_tokens is not None and train_tokens.nbytes <= DEVICE_CORPUS_MAX_BYTES
            and train_tokens.shape[0] < 2**31)
    if t.loader == "device" and train_tokens.shape[0] >= 2**31:
        raise RelposError(f"train.loader=device: the training split has "
                          f"{train_tokens.shape[0]:,} tokens, beyond int32 indices; use "
                          "train.loader=host")
    if t.loader == "auto":
        return "device" if task is None and fits else "host"
    return t.loader


def call_inputs(cfg, train_tokens, multi: bool, mesh, sample=None, *, on_device: bool):
    """``inputs(step, n)``: the arguments after the state of the compiled call of ``n``
    steps from ``step`` (:class:`relpos.training.loop.Trainer`), placed on the device or
    the mesh, a function of (seed, step) only (it runs ahead, in the trainer's
    prefetching thread):

    * ``on_device``: ``(starts, positions, step, corpus)``, ``starts [B]`` (``[n, B]``)
      from :func:`relpos.data.window_starts` and the training split on the device once
      (replicated on a mesh); the step gathers the windows, the same tokens as
      :func:`relpos.data.train_batch`.
    * else ``(tokens, positions, step)``: the batches of :func:`_batches` (a task's
      ``sample``, or the windows gathered on the host).
    """
    t = cfg.train
    if mesh is None:
        put = lambda x, stacked=False, batched=True: jax.device_put(x)  # noqa: E731
    else:
        def put(x, stacked=False, batched=True):
            sh = par.batch_sharding(mesh, stacked) if batched else par.replicated(mesh)
            return par.put(x, sh)
    fixed = put(np.arange(t.length, dtype=np.int32), batched=False)  # on the device once

    def positions(step, n):
        if not t.randomized_positions:
            return fixed
        pos = [data_lib.random_positions(seed=cfg.seed, step=s, batch_size=t.batch_size,
                                         length=t.length, max_position=t.randomized_positions)
               for s in range(step, step + n)]
        return put(np.stack(pos) if multi else pos[0], multi)

    step_arg = lambda step: put(np.int32(step), batched=False)  # noqa: E731
    if not on_device:
        def batch_at(step):
            return sample(step) if sample else data_lib.train_batch(
                train_tokens, seed=cfg.seed, step=step, batch_size=t.batch_size,
                length=t.length)

        def inputs(step, n):
            tokens = [batch_at(s) for s in range(step, step + n)]
            tokens = jax.tree.map(lambda *x: np.stack(x), *tokens) if multi else tokens[0]
            return put(tokens, multi), positions(step, n), step_arg(step)

        return inputs
    corpus = put(np.asarray(train_tokens), batched=False)

    def inputs(step, n):
        starts = [data_lib.window_starts(train_tokens.shape[0], seed=cfg.seed, step=s,
                                         batch_size=t.batch_size, length=t.length)
                  for s in range(step, step + n)]
        starts = (np.stack(starts) if multi else starts[0]).astype(np.int32)
        return put(starts, multi), positions(step, n), step_arg(step), corpus

    return inputs


def _batches(cfg, train_tokens: np.ndarray, multi: bool, place, sample=None):
    """``batches(step, n)``: the training windows of steps ``step .. step+n-1`` (stacked
    ``[n, B, T+1]`` for a multi-step call), a function of (seed, step) only; ``sample``
    (step -> batch), if given, draws them instead (a task's, :func:`task_sampler`)."""
    t = cfg.train
    fixed_positions = jnp.arange(t.length, dtype=jnp.int32)  # on device once

    def batch_at(step):
        tokens = sample(step) if sample else data_lib.train_batch(
            train_tokens, seed=cfg.seed, step=step, batch_size=t.batch_size, length=t.length)
        if t.randomized_positions:
            return tokens, data_lib.random_positions(
                seed=cfg.seed, step=step, batch_size=t.batch_size, length=t.length,
                max_position=t.randomized_positions)
        return tokens, fixed_positions

    def batches(step, n):
        if not multi:
            return place(*batch_at(step))
        tokens, pos = zip(*(batch_at(s) for s in range(step, step + n)))
        pos = np.stack(pos) if t.randomized_positions else fixed_positions
        return place(jax.tree.map(lambda *x: np.stack(x), *tokens), pos)

    return batches


def _hparams(cfg) -> dict:
    name, opts = bias_options(cfg.bias)
    flat = {"bias": name, "seed": cfg.seed, "train_length": cfg.train.length,
            "steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "lr": cfg.optim.lr}
    flat.update({f"model.{k}": v for k, v in plain(cfg.model).items()
                 if isinstance(v, (int, float, str, bool))})
    flat.update({f"bias.{k}": v for k, v in opts.items() if isinstance(v, (int, float, str, bool))})
    if plain(cfg.task).get("name", "lm") != "lm":
        flat.update({f"task.{k}": v for k, v in plain(cfg.task).items()})
    return flat


# ----------------------------------------------------------------------------- evaluation


def saved_run_config(run_dir: Path, bias_overrides=None):
    """A finished run's saved training config, with optional scheme-option overrides."""
    saved = run_dir / "relpos_config.yaml"
    if not saved.exists():
        raise RelposError(f"{run_dir} is not a relpos run directory (no relpos_config.yaml); "
                          "give run_dir=<the run directory relpos-train printed>")
    tcfg = load_saved_config(saved)
    if bias_overrides:
        tcfg.bias = OmegaConf.merge(tcfg.bias, bias_overrides)
    return tcfg


def restore_model(run_dir: Path, tcfg, model) -> tuple[int, Any]:
    """``model`` (built from the run's config) with the parameters of the run's latest
    checkpoint (no optimiser is built): ``(step, model)``."""
    graphdef, params = nnx.split(model, nnx.Param)
    ckpt = Checkpoints(run_dir / "checkpoints", tcfg.train.keep_checkpoints)
    try:
        restored = ckpt.restore_params(params)
    finally:
        ckpt.close()
    if restored is None:
        raise RelposError(f"no checkpoint in {run_dir / 'checkpoints'}")
    step, params = restored
    return step, nnx.merge(graphdef, params)


def evaluate_run(cfg) -> dict:
    """``relpos-eval``: rebuild a finished run from its directory, restore the parameters
    of its latest checkpoint (no optimiser is built) and evaluate with ``cfg.eval`` (and
    optional scheme-option overrides); writes ``<run_dir>/<output>``."""
    run_dir = Path(cfg.run_dir).expanduser()
    tcfg = saved_run_config(run_dir, cfg.bias_overrides)
    evaluation.check_eval_config(cfg.eval)
    task = task_of(tcfg)  # None: the corpus LM
    check_task_eval_config(task, cfg.eval, tcfg.train.length, tcfg.data.tokenizer)
    corpus = load_data(tcfg.data, task)
    if task is None:
        evaluation.check_lengths_fit(cfg.eval, tcfg.train.length, corpus.val.size)
    model = build_model(tcfg, corpus.vocab_size)
    evaluation.check_positions_reach(model, max(test_lengths(cfg.eval, tcfg.train.length, task)))
    step, model = restore_model(run_dir, tcfg, model)
    base = {}
    if (run_dir / "results.json").exists():
        base = json.loads((run_dir / "results.json").read_text())
    name, opts = bias_options(tcfg.bias)
    label = cfg.label or base.get("label") or default_label(name, tcfg.optim)
    if cfg.bias_overrides and not cfg.label:  # another scheme setting: another curve
        label += " (" + ", ".join(f"{k}={v}" for k, v in plain(cfg.bias_overrides).items()) + ")"
    if cfg.eval.key_window and not cfg.label:
        label += f" (keys < {cfg.eval.key_window})"
    L = tcfg.train.length
    results = {**{k: v for k, v in base.items()
                  if k not in ("eval", "attention_far_mass", "key_window")},
               "bias": name, "bias_options": opts, "train_length": L,
               "seed": tcfg.seed, "label": label, "checkpoint_step": step,
               "bias_overrides": plain(cfg.bias_overrides) or None}
    if task is not None:
        results.update(task=task.name, task_options=task.options())
    results.update(evaluations(model, task, corpus, L, cfg.eval))
    if callable(getattr(model.position, "bias", None)):  # of the scheme as evaluated
        results["bias_profile"] = evaluation.bias_profile(
            model, train_length=L, max_length=max(test_lengths(cfg.eval, L, task)))
    atomic_write_json(run_dir / cfg.output, results)
    return results


# ----------------------------------------------------------------------------- tasks


def task_of(cfg) -> tasks_lib.Task | None:
    """The run's length-generalization task (``cfg.task``; :mod:`relpos.tasks`), or None
    for the corpus LM (``task=lm``)."""
    opts = dict(plain(cfg.task) or {})
    name = opts.pop("name", None) or "lm"
    if name == "lm":
        if opts:
            raise RelposError(f"task=lm has no options; got {', '.join(sorted(opts))}")
        return None
    return tasks_lib.build(name, **opts)


def check_task_config(cfg) -> None:
    """Before any data is loaded: the task, its options, that an instance fits
    train.length and every test length, and the vocabulary (task runs); the passkey
    evaluation's needs (``eval.passkey`` on the LM)."""
    task = task_of(cfg)
    if task is not None:
        task.check_length(cfg.train.length, "train.length")
    check_task_eval_config(task, cfg.eval, cfg.train.length, cfg.data.tokenizer)
    if task is None:
        return
    v = cfg.model.vocab_size
    if v and v < task.vocab_size:
        raise RelposError(f"model.vocab_size={v} is smaller than task={task.name}'s "
                          f"vocabulary of {task.vocab_size}; leave it null (the task's)")


def check_task_eval_config(task, ecfg, train_length: int, tokenizer: str) -> None:
    if task is None:
        if ecfg.passkey:
            passkey = tasks_lib.build("passkey")
            tasks_lib.check_tokenizer(passkey, tokenizer)
            if not evaluation.passkey_lengths(ecfg, train_length, passkey):
                raise RelposError(
                    f"eval.passkey: no evaluation length fits the passkey prompt "
                    f"({passkey.fixed} tokens); add longer eval.multiples or eval.lengths")
        return
    evaluation.check_task_eval(ecfg)
    if task.uses_corpus:
        tasks_lib.check_tokenizer(task, tokenizer)
    for length in evaluation.task_lengths(ecfg, train_length):
        task.check_length(length, "test length")


def load_data(data_cfg, task) -> data_lib.Corpus:
    """The corpus (the LM, and tasks that draw filler from it); for a task that needs
    none, an empty stand-in with the task's vocabulary (its results name no dataset)."""
    if task is not None and not task.uses_corpus:
        empty = np.zeros(0, np.int32)
        return data_lib.Corpus(None, None, None, task.vocab_size, empty, empty)
    return data_lib.load_corpus(data_cfg)


def test_lengths(ecfg, train_length: int, task) -> list[int]:
    """Every length the evaluation will run a model at."""
    if task is None:
        return evaluation.eval_lengths(ecfg, train_length)
    return evaluation.task_lengths(ecfg, train_length)


def task_sampler(cfg, task, train_tokens):
    """``step -> WeightedTokens`` of the task's training batch (None for the LM)."""
    if task is None:
        return None
    source = train_tokens if task.uses_corpus else None

    def sample(step):
        tokens, weights = tasks_lib.train_batch(
            task, seed=cfg.seed, step=step, batch_size=cfg.train.batch_size,
            length=cfg.train.length, source=source)
        return WeightedTokens(tokens, weights, tasks_lib.model_inputs(task, tokens, weights))

    return sample


def evaluations(model, task, corpus, train_length: int, ecfg) -> dict:
    """A run's ``eval`` entries (perplexity for the LM, then any task or passkey
    accuracies) and, for the LM, its ``attention_far_mass``; with ``eval.key_window`` W,
    of the model with keys at offsets >= W masked (and ``key_window`` recorded)."""
    out = {"eval": []}
    if ecfg.key_window:
        model = evaluation.with_key_window(model, ecfg.key_window)
        out["key_window"] = ecfg.key_window
    if task is None:
        out["eval"] = evaluation.evaluate(model, corpus.val, train_length=train_length,
                                          ecfg=ecfg)
        out["attention_far_mass"] = evaluation.attention_far_mass(
            model, corpus.val, train_length=train_length, ecfg=ecfg,
            windows=ecfg.attention_windows)
    out["eval"] += task_evaluations(model, task, corpus, train_length, ecfg)
    return out


def task_evaluations(model, task, corpus, train_length: int, ecfg) -> list[dict]:
    """A task run's accuracy entries, or an LM's passkey entries (``eval.passkey``)."""
    if task is not None:
        return evaluation.evaluate_task(
            model, task, evaluation.task_lengths(ecfg, train_length), ecfg,
            source=corpus.val if task.uses_corpus else None)
    if ecfg.passkey:
        return evaluation.evaluate_passkey(model, corpus.val, corpus.tokenizer, train_length,
                                           ecfg)
    return []


def task_validation(model, task, val, length: int, ecfg, examples: int = 64) -> dict:
    """``train.eval_every`` for a task: accuracy on the first test sequences at
    train.length."""
    correct, total = evaluation.score_task_length(
        model, task, length, examples=min(examples, ecfg.task_examples),
        batch_tokens=ecfg.batch_tokens, chunk=ecfg.loss_chunk,
        source=val if task.uses_corpus else None)
    return {"val_accuracy": float((correct == total).mean()),
            "val_token_accuracy": float(correct.sum() / total.sum())}


def eval_scalars(e: dict) -> dict:
    """An eval entry's TensorBoard scalars: perplexity, or (tasks, passkey) accuracies."""
    name = f"eval_{e['mode']}"
    if "ppl" in e:
        return {f"{name}/ppl_L{e['length']}": e["ppl"]}
    return {f"{name}/accuracy_L{e['length']}": e["accuracy"],
            f"{name}/token_accuracy_L{e['length']}": e["token_accuracy"]}
