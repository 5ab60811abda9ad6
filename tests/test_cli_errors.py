"""Bad input to the command-line tools (issue 4's list and issue 7 item 6).

A mistake in the user's input must end the run with a non-zero exit status and one line
on stderr that says what is wrong (``relpos-train: error: ...``) — no Python traceback —
and, where it can be known up front, before any training. Config keys that do not exist
are Hydra's to report: its message spans a few lines, names the key, and has no
traceback either. Most cases run in this process, as the console script would run
them (``helpers.run_cli_in_process``: the same ``main()``, argv and working directory);
those marked ``subprocess`` (and any that set environment variables) run the installed
script itself, one per command and one for Hydra's own error, so the wiring from console
script to message is tested too.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from helpers import Workspace, cli_argv, compose_train, run_cli_in_process
from omegaconf import OmegaConf

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_SKIP = "running as root: file permissions do not stop root"


@dataclass
class Case:
    args: list[str]  # "{root}" becomes the workspace folder
    expect: str  # must appear in stderr
    cmd: str = "train"
    hydra: bool = False  # Hydra's own (multi-line) message, exit status 1
    data: bool = True  # add the generated text corpus (data=text_files ...)
    env: dict = field(default_factory=dict)
    before_training: bool = True  # no checkpoint may have been written
    skip: str | None = None
    subprocess: bool = False  # run the installed console script (else in this process)

    def __post_init__(self):
        self.subprocess = self.subprocess or bool(self.env)  # env: only a new process reads it


CASES = {
    # schemes and their options
    "unknown_scheme_group": Case(["bias=nope"], "Could not find 'bias/nope'", hydra=True,
                                 subprocess=True),
    "unknown_scheme_name": Case(
        ["bias.name=nope"], "unknown position scheme 'nope'; available: alibi, cope, dape, fire,"),
    "t5_one_bucket": Case(["bias=t5", "bias.num_buckets=1"],
                          "num_buckets must be an integer >= 2, got 1"),
    "fire_negative_threshold": Case(["bias=fire", "bias.threshold=-1"],
                                    "threshold must be a positive finite number, got -1"),
    "fire_option_of_wrong_type": Case(["bias=fire", "bias.hidden=abc"],
                                      "option 'hidden' of position scheme 'fire' must be an int "
                                      "(its default is 32), got 'abc'"),
    "kerple_unknown_option": Case(["bias=kerple_power", "+bias.foo=1"],
                                  "'foo' is not an option of position scheme 'kerple_power'; "
                                  "valid options: "),
    "learned_abs_beyond_table": Case(
        ["bias=learned_abs", "bias.policy=error"],
        "learned_abs: position 31 has no row in the table of max_length=16"),
    "offset_beyond_table": Case(["bias=offset", "bias.policy=error"],
                                "offset bias: offset 31 is beyond the trained offsets 0..15"),
    # config keys and sizes
    "unknown_key": Case(["train.foo=1"], "Key 'foo' not in 'TrainSection'", hydra=True),
    "d_model_zero": Case(["model.d_model=0"], "model.d_model must be an integer >= 1, got 0"),
    "steps_negative": Case(["train.steps=-1"], "train.steps must be an integer >= 1, got -1",
                           subprocess=True),
    "position_lr_scale_zero": Case(["optim.position_lr_scale=0"],
                                   "optim.position_lr_scale must be a positive finite number, "
                                   "got 0"),
    "heads_not_dividing": Case(["model.num_heads=3"],
                               "model.num_heads=3 must divide model.d_model=32"),
    "nonfinite_policy": Case(["train.on_nonfinite=ignore"],
                             "train.on_nonfinite must be one of 'error', 'skip'; got 'ignore'"),
    "eval_length_zero": Case(["eval.lengths=[0]"],
                             "eval.lengths entries must be integers >= 1, got 0"),
    "eval_multiple_zero": Case(["eval.multiples=[0]"],
                               "eval.multiples entries must be integers >= 1, got 0"),
    "eval_mode_unknown": Case(["eval.modes=[strided]"],
                              "eval.modes entries must be one of nonoverlap, sliding"),
    "eval_longer_than_val": Case(["eval.lengths=[100000]"],
                                 "eval length 100000 is longer than the validation split ("),
    # data
    "directory_as_file": Case(["data=text_files", "data.paths=[{root}/empty_dir]"],
                              "corpus path {root}/empty_dir is a directory; data.paths lists "
                              "files", data=False),
    "missing_file": Case(["data=text_files", "data.paths=[{root}/missing.txt]"],
                         "corpus file not found: {root}/missing.txt", data=False),
    "empty_file": Case(["data=text_files", "data.paths=[{root}/empty.txt]"],
                       "corpus file is empty: {root}/empty.txt", data=False),
    "unreadable_file": Case(["data=text_files", "data.paths=[{root}/secret.txt]"],
                            "corpus file is not readable: {root}/secret.txt", data=False,
                            skip=ROOT_SKIP if IS_ROOT else None),
    "no_files": Case(["data=text_files"], "data=text_files needs data.paths=", data=False),
    "hub_offline": Case(["data=wikitext103"],
                        "needs network, but the hub is offline here (HF_HUB_OFFLINE/"
                        "HF_DATASETS_OFFLINE); offline options: data=stdlib (default) or "
                        "data=text_files", data=False, env={"HF_HUB_OFFLINE": "1"}),
    # output and resume
    "output_dir_under_a_file": Case(["hydra.run.dir={root}/afile/run"],
                                    "cannot write the output directory {root}/afile/run "
                                    "(Not a directory)"),
    "output_dir_read_only": Case(["hydra.run.dir={root}/readonly/run"],
                                 "cannot write the output directory {root}/readonly/run",
                                 skip=ROOT_SKIP if IS_ROOT else None),
    "resume_other_model": Case(["hydra.run.dir={root}/other_model"],
                               "holds a run with a different configuration (model.d_model, "
                               "model.num_heads); use a new hydra.run.dir"),
    # relpos-eval and relpos-plot
    "eval_without_run_dir": Case([], "run_dir is required: relpos-eval run_dir=", cmd="eval",
                                 data=False),
    "eval_not_a_run": Case(["run_dir={root}"], "is not a relpos run directory", cmd="eval",
                           data=False, subprocess=True),
    "plot_no_results": Case(["inputs=[{root}/empty_dir]", "out_dir={root}/figs"],
                            "no results.json found under {root}/empty_dir", cmd="plot",
                            data=False, subprocess=True),
}


def run_case(ws: Workspace, name: str, case: Case) -> subprocess.CompletedProcess:
    fill = lambda s: s.replace("{root}", str(ws.root))
    args = [fill(a) for a in case.args]
    if case.cmd == "train":
        base = ws.args if case.data else [a for a in ws.args if not a.startswith("data=")
                                          and not a.startswith("data.paths=")]
        has_dir = any(a.startswith("hydra.run.dir=") for a in args)
        args = base + ["train.steps=2"] + args + \
            ([] if has_dir else [f"hydra.run.dir={ws.root / 'runs' / name}"])
    if case.subprocess:
        return subprocess.run(cli_argv(case.cmd) + args, capture_output=True, text=True,
                              cwd=ws.root, env={**ws.env, **case.env}, timeout=300)
    return run_cli_in_process(case.cmd, args, ws.root)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("cli_errors"), tmp_path_factory.getbasetemp())
    root = ws.root
    (root / "empty.txt").write_bytes(b"")
    (root / "secret.txt").write_text("hidden text " * 100)
    (root / "secret.txt").chmod(0)
    (root / "afile").write_text("a file, not a folder")
    (root / "readonly").mkdir(mode=0o555)
    (root / "empty_dir").mkdir()
    other = root / "other_model"
    (other / "checkpoints" / "5").mkdir(parents=True)
    cfg = compose_train(ws.args + ["train.steps=2", "model.d_model=64", "model.num_heads=4"])
    (other / "relpos_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return ws


@pytest.fixture(scope="module")
def outcomes(ws) -> dict[str, subprocess.CompletedProcess]:
    todo = {name: case for name, case in CASES.items() if not case.skip}
    apart = {name for name, case in todo.items() if case.subprocess}
    with ThreadPoolExecutor(max_workers=2) as pool:  # the scripts, while the rest run here
        futures = {name: pool.submit(run_case, ws, name, todo[name]) for name in apart}
        here = {name: run_case(ws, name, case) for name, case in todo.items()
                if name not in apart}
        return here | {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_with_one_clear_line(name, ws, outcomes):
    case = CASES[name]
    if case.skip:
        pytest.skip(case.skip)
    r = outcomes[name]
    expect = case.expect.replace("{root}", str(ws.root))
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert expect in r.stderr, r.stderr
    if case.hydra:
        assert r.returncode == 1
    else:
        assert r.returncode == 2, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert lines == [lines[0]] and lines[0].startswith(f"relpos-{case.cmd}: error: "), \
            r.stderr
    if case.cmd == "train" and case.before_training:
        assert not list((ws.root / "runs").glob(f"{name}/checkpoints/*"))


def test_unknown_scheme_lists_every_valid_one(outcomes):
    from relpos import positions

    for name in ("unknown_scheme_group", "unknown_scheme_name"):
        err = outcomes[name].stderr
        assert all(s in err for s in positions.available()), err


def test_non_utf8_text_just_works(ws):
    """Undecodable bytes become U+FFFD: the bytes tokenizer trains on them."""
    path = ws.root / "latin1.txt"
    path.write_bytes(("caf\xe9 na\xefve r\xe9sum\xe9 \x80\xff\xfe " * 800).encode("latin-1"))
    run = ws.root / "runs" / "latin1"
    r = subprocess.run(
        cli_argv("train") + [a for a in ws.args if not a.startswith("data.paths=")]
        + [f"data.paths=[{path}]", "train.steps=3", "train.log_every=1",
           "eval.multiples=[1]", "eval.modes=[nonoverlap]", "eval.tokens=64",
           f"hydra.run.dir={run}"],
        capture_output=True, text=True, cwd=ws.root, env=ws.env, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads((run / "results.json").read_text())
    assert res["tokenizer"] == "bytes" and res["eval"][0]["tokens"] == 64


def test_ctrl_c_outside_the_training_loop_is_one_line(capsys):
    from relpos.cli import common

    def app():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        common.interruptible("relpos-train", app)
    assert stop.value.code == 130
    assert capsys.readouterr().err == "relpos-train: interrupted\n"


def test_a_failed_run_writes_its_error_to_train_log(ws, outcomes):
    log = (ws.root / "runs" / "steps_negative" / "train.log").read_text()
    assert "error: train.steps must be an integer >= 1, got -1" in log


def test_relpos_eval_writes_nothing_into_a_folder_that_is_not_a_run(ws, outcomes):
    assert outcomes["eval_not_a_run"].returncode == 2
    assert not list(ws.root.glob("*.log")) and not (ws.root / ".hydra").exists()
