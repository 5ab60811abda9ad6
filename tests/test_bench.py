"""Smoke test of ``relpos-bench`` (tiny preset, 2 steps): fields, not wall times."""

import importlib.util
import json

import pytest
from flax import nnx

from relpos.bench.cases import preset_config, scheme_options, time_rounds
from relpos.bench.cli import main, parse_args
from relpos.bench.memory import eval_point
from relpos.bench.report import non_embedding_params, train_flops_per_token
from relpos.nn import TransformerLM

# the peer's optional dependencies (relpos[bench]) that are not installed here
PEER_MISSING = [m for m in ("torch", "x_transformers") if importlib.util.find_spec(m) is None]


def test_flops_convention_hand_computed():
    # small preset: 4 layers x (qkv 3d^2 + out d^2 + fc 2*4d^2 + fc biases 5d + 2 LN 4d)
    # + final LN 2d, d = 256
    d, L, T = 256, 4, 256
    n = L * (12 * d * d + 5 * d + 4 * d) + 2 * d
    assert n == 3_155_456
    assert train_flops_per_token(n, L, T, d) == 6 * n + 12 * L * T * d
    model = TransformerLM(preset_config("small"), "t5", rngs=nnx.Rngs(params=0))
    assert non_embedding_params(model) == n  # embedding and t5 table excluded


def test_scheme_options_follow_training_configs():
    assert scheme_options("offset", 96)["size"] == 96
    assert scheme_options("learned_abs", 96)["max_length"] == 96
    assert "name" not in scheme_options("alibi", 96)
    # T5's max_distance follows the length through its defaults list and a resolver
    assert scheme_options("t5", 96) == {"num_buckets": 32, "max_distance": 48, "init_std": 0.02}


@pytest.mark.slow  # the whole benchmark CLI in miniature, about 27 s on 2 cores
def test_bench_main_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--repeats", "1",
          "--schemes", "alibi", "--eval-lengths", "512", "--peak-sizes", "256",
          "--length", "64", "--batch", "4", "--peer", "--steps-per-call", "1,2",
          "--attn-impl", "blockwise", "--spec-peak-tflops", "0.5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "MFU" in printed and "blockwise" in printed
    assert "MFU against the data-sheet peak of 0.5 TFLOP/s: none " in printed
    r = json.loads(out.read_text())
    assert r["matmul_peak"]["gflops"] > 0 and r["matmul_peak"]["dtype"] == "float32"
    flops = r["train"]["flops"]
    assert flops["causal_half_discounted"] is False and "6 N + 12 L T d" in flops["convention"]
    rows = {row["scheme"]: row for row in r["train"]["rows"]}
    # none is always the reference, at each number of steps per call
    assert set(rows) == {"none", "alibi", "none/k2", "alibi/k2"}
    assert rows["alibi/k2"]["steps_per_call"] == 2 and rows["alibi"]["steps_per_call"] == 1
    for row in rows.values():
        for key in ("tokens_per_s", "step_s", "mfu", "ratio_to_none", "compile_s",
                    "round_s", "final_loss"):
            assert row[key] is not None, key
        assert row["skipped_steps"] == 0
        assert row["minor_faults_per_step"] >= 0 and row["sys_s_per_step"] >= 0
        assert row["attention"] == "blockwise"  # --attn-impl reaches the model
        assert row["mfu_spec"] == pytest.approx(row["mfu"] * r["matmul_peak"]["gflops"] / 500)
    assert rows["none"]["ratio_to_none"] == rows["none/k2"]["ratio_to_none"] == 1.0
    peer = r["train"]["peer"]
    assert peer["requested"] is True
    if PEER_MISSING:  # unavailable, and the reason names the package that is missing
        assert peer["available"] is False, peer
        assert f"No module named '{PEER_MISSING[0]}'" in peer["reason"], peer
    else:  # installed: the peer must build and be timed against relpos alibi
        assert peer["available"] is True, peer
        by_k = peer["relpos_alibi_speedup_by_steps_per_call"]
        assert set(by_k) == {"1", "2"} and peer["relpos_alibi_speedup"] == by_k["2"]
        assert all(v > 0 for v in by_k.values()) and peer["tokens_per_s"] > 0
        assert "peer: relpos alibi / x-transformers" in printed
    points = {p["impl"]: p for p in r["eval"]["points"]}
    assert set(points) == {"dense", "blockwise"}
    for p in points.values():
        assert p["status"] == "ok", p
        assert p["length"] == 512 and p["tokens_per_s"] > 0
        assert p["xla_memory"]["total"] > 0
    assert r["host"]["loadavg_end"]


def test_dense_eval_skipped_over_cap():
    p = eval_point(preset="tiny", dtype="float32", scheme="alibi", impl="dense",
                   length=256, batch=1, chunk=128, block_size=64,
                   max_dense_gib=1e-6, repeats=1)
    assert p["status"] == "skipped" and "max-dense-gib" in p["note"]
    assert p["xla_peak_gib"] > 1e-6


def test_steps_per_call_must_divide_the_timed_steps():
    with pytest.raises(SystemExit):
        parse_args(["--steps", "5", "--steps-per-call", "1,2"])
    with pytest.raises(SystemExit):
        parse_args(["--steps", "8", "--steps-per-call", "8,8"])
    assert parse_args(["--steps", "8", "--steps-per-call", "1,8"]).steps_per_call == [1, 8]


def test_unknown_scheme_is_a_usage_error():
    with pytest.raises(SystemExit):
        parse_args(["--schemes", "alibi,nope"])


def test_schemes_none_is_the_none_scheme_not_an_empty_list():
    assert parse_args(["--schemes", "none"]).schemes == ["none"]
    assert parse_args(["--schemes", "none, alibi"]).schemes == ["none", "alibi"]
    assert parse_args(["--eval-lengths", "none"]).eval_lengths == []


def test_round_order_varies_every_cases_predecessor():
    """Every case is timed once per round, and over the rounds (across round boundaries
    too) no case always follows the same one."""
    order = []

    class Fake:
        steps_per_call = 1

        def __init__(self, name):
            self.name = name

        def run(self, n):
            order.append(self.name)
            return 0.5 * n

    for n in (2, 3, 5, 25):
        names = [f"c{i}" for i in range(n)]
        for repeats in (2, 3, 4):
            order.clear()
            times = time_rounds([Fake(x) for x in names], steps=4, warmup=0,
                                repeats=repeats, log=lambda *_: None)
            assert times == {x: [2.0] * repeats for x in names}
            rounds = [order[i * n:(i + 1) * n] for i in range(repeats)]
            assert all(sorted(r) == sorted(names) for r in rounds)
            before = {x: set() for x in names}
            for prev, cur in zip(order, order[1:]):
                before[cur].add(prev)
            if n >= 3:
                assert all(len(p) >= 2 for x, p in before.items() if x != order[0]), before
