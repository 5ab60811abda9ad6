"""The study's statistics and controls: targets spread over the split, bootstrap
intervals, the excess loss against the same targets at the training length, the offset
table's mask policy, table coverage, and relpos-plot's refusal to pool unlike runs."""

from types import SimpleNamespace as NS

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import relpos.positions as P
from relpos import plots
from relpos.errors import RelposError
from relpos.evaluation import (
    attention_far_mass,
    evaluate,
    ratio_ci,
    table_coverage,
    target_blocks,
    window_plan,
    with_key_window,
)
from relpos.model import ModelConfig, TransformerLM
from relpos.nn.attention import attention_weights, blockwise_attention, dense_attention


def scored_targets(windows, L):
    out = []
    for s, f, stop in zip(windows.starts, windows.first, windows.stop):
        out += [s + p + 1 for p in range(f, L) if s + p + 1 < stop]
    return out


@pytest.mark.parametrize("n_val,lengths,tokens,stride",
                         [(5000, [16, 32, 64], 600, 0), (3000, [16, 48, 100], 1000, 5),
                          (700, [64, 128], 10**6, 0)])
def test_every_length_and_mode_scores_the_same_targets_once(n_val, lengths, tokens, stride):
    ecfg = NS(tokens=tokens, stride=stride)
    ref = None
    for mode in ("nonoverlap", "sliding"):
        for L, w in window_plan(n_val, lengths, mode, ecfg).items():
            assert (w.starts >= 0).all() and (w.starts + L + 1 <= n_val).all()
            t = scored_targets(w, L)
            assert len(t) == len(set(t)), (mode, L)
            ref = sorted(t) if ref is None else ref
            assert sorted(t) == ref, (mode, L)
    assert len(ref) == min(-(-tokens // max(lengths)) * max(lengths), len(ref))


def test_targets_come_from_across_the_split():
    blocks, size = target_blocks(100_000, [64, 2048], NS(tokens=65536, stride=0))
    assert len(blocks) == 32 and size == 2048
    assert blocks[0] < 2000 and blocks[-1] + size > 98_000  # first and last part of the split
    assert (np.diff(blocks) >= size).all()


def test_ratio_ci_brackets_the_estimate_and_narrows_with_more_clusters():
    rng = np.random.default_rng(1)
    den = rng.integers(50, 100, 20).astype(float)
    num = den * rng.normal(2.0, 0.3, 20)
    lo, hi = ratio_ci(num, den)
    assert lo < num.sum() / den.sum() < hi
    lo4, hi4 = ratio_ci(np.tile(num, 4), np.tile(den, 4))
    assert 0.4 < (hi4 - lo4) / (hi - lo) < 0.6  # 1/sqrt(4)
    assert ratio_ci(num[:2], den[:2]) is None  # too few clusters for an interval
    lo, hi = ratio_ci(2 * den, den)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)


def test_seed_interval_is_a_t_interval_with_ddof_1():
    m, lo, hi = plots.seed_interval([4.0, 5.0, 6.0])
    half = 4.302652729911275 * 1.0 / np.sqrt(3)  # t(0.975, df=2) * std(ddof=1) / sqrt(n)
    assert (m, lo, hi) == pytest.approx((5.0, 5.0 - half, 5.0 + half))


def test_excess_loss_is_zero_where_the_context_is_the_same():
    """In windows of 2L, positions < L see exactly the context the same targets have in
    windows of L, so their excess is 0; the breakpoint is searched only beyond L."""
    model = TransformerLM(ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2),
                          "alibi", {}, rngs=nnx.Rngs(0))
    val = np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16)
    ecfg = NS(lengths=[16, 32], multiples=None, modes=["nonoverlap"], stride=0, tokens=640,
              batch_tokens=256, loss_chunk=32, progress=False)
    out = {e["length"]: e for e in evaluate(model, val, train_length=16, ecfg=ecfg)}
    assert "position_excess" not in out[16]
    bins = out[32]["position_bins"]
    below = [x for lo, x in zip(bins[:-1], out[32]["position_excess"]) if lo < 16]
    np.testing.assert_allclose(below, 0.0, atol=1e-6)
    assert out[32]["blocks"] == 20 and out[32]["tokens"] == 640
    lo, hi = out[32]["ppl_ci"]
    assert lo < out[32]["ppl"] < hi


def test_offset_mask_policy_is_a_window_of_size_keys():
    size, T = 4, 12
    scheme = P.build("offset", num_heads=2, head_dim=8, size=size, policy="mask", init_std=0.5)
    table = np.asarray(scheme.table[...])
    pos = jnp.arange(T)
    b = np.asarray(scheme.bias(pos, pos))
    for i in range(T):
        for j in range(i + 1):
            want = table[:, i - j] if i - j < size else -np.inf
            np.testing.assert_array_equal(b[:, i, j], want)
    q, k, v = (jax.random.normal(jax.random.key(n), (1, T, 2, 8)) for n in range(3))
    out = np.asarray(dense_attention(q, k, v, bias=scheme.bias, q_pos=pos, k_pos=pos,
                                     scale=8 ** -0.5))
    qn, kn, vn = (np.asarray(x, np.float64)[0] for x in (q, k, v))
    for h in range(2):  # naive: softmax over the keys within the window only
        for i in range(T):
            js = [j for j in range(i + 1) if i - j < size]
            s = np.array([qn[i, h] @ kn[j, h] * 8 ** -0.5 + table[h, i - j] for j in js])
            p = np.exp(s - s.max())
            p /= p.sum()
            np.testing.assert_allclose(out[0, i, h], p @ vn[js, h], rtol=1e-5, atol=1e-6)

    def loss(t, attend, **kw):
        fn = lambda qp, kp: jnp.take(t, jnp.maximum(qp[:, None] - kp[None], 0), axis=1,  # noqa: E731
                                     mode="fill", fill_value=-jnp.inf)
        return (attend(q, k, v, bias=fn, q_pos=pos, k_pos=pos, scale=8 ** -0.5, **kw) ** 2).sum()

    t = jnp.asarray(table)
    g_dense = jax.grad(loss)(t, dense_attention)
    g_block = jax.grad(loss)(t, blockwise_attention, block_q=4, block_k=4)
    assert np.isfinite(np.asarray(g_dense)).all()
    np.testing.assert_allclose(g_block, g_dense, rtol=1e-4, atol=1e-6)


def test_attention_weights_match_a_naive_softmax():
    T, H, d = 9, 2, 8
    q, k = (jax.random.normal(jax.random.key(n), (1, T, H, d)) for n in range(2))
    bias = np.random.default_rng(1).normal(size=(H, T, T))
    got = np.asarray(attention_weights(q, k, bias=jnp.asarray(bias, jnp.float32),
                                       q_pos=jnp.arange(T), k_pos=jnp.arange(T), scale=0.3))
    qn, kn = (np.asarray(x, np.float64)[0] for x in (q, k))
    for h in range(H):
        for i in range(T):
            s = np.array([qn[i, h] @ kn[j, h] * 0.3 + bias[h, i, j] for j in range(i + 1)])
            p = np.exp(s - s.max())
            np.testing.assert_allclose(got[0, h, i, :i + 1], p / p.sum(), rtol=1e-5, atol=1e-7)
            assert (got[0, h, i, i + 1:] == 0).all()  # causal


def far_mass_model(position, **opts):
    cfg = ModelConfig(vocab_size=11, d_model=16, num_layers=2, num_heads=2)
    return TransformerLM(cfg, position, opts, rngs=nnx.Rngs(0))


def test_attention_far_mass_is_zero_for_a_window_and_matches_a_naive_sum():
    L, T = 8, 32
    val = np.random.default_rng(0).integers(0, 11, 4000)
    ecfg = NS(multiples=[1, 4], lengths=None, modes=["nonoverlap"], stride=0, tokens=4 * T,
              batch_tokens=64, loss_chunk=16, progress=False, attention_windows=4)
    masked = far_mass_model("offset", size=L, policy="mask", init_std=0.5)
    (entry,) = attention_far_mass(masked, val, train_length=L, ecfg=ecfg, windows=4)
    assert entry["length"] == T and entry["windows"] == 4 and entry["mean"] == 0.0

    # eval.key_window = L: the same table with clip and keys >= L masked is the mask
    # policy exactly, and no scheme then puts mass beyond L
    clip = far_mass_model("offset", size=L, policy="clip", init_std=0.5)
    tokens = jnp.asarray(val[:T][None], jnp.int32)
    np.testing.assert_allclose(with_key_window(clip, L)(tokens), masked(tokens), atol=1e-5)
    assert not np.allclose(clip(tokens), masked(tokens), atol=1e-3)
    assert with_key_window(clip, 0) is clip
    for m in (clip, far_mass_model("none")):
        (entry,) = attention_far_mass(with_key_window(m, L), val, train_length=L, ecfg=ecfg,
                                      windows=2)
        assert entry["mean"] == 0.0

    model = far_mass_model("none")  # naive: the layers' probabilities, summed by hand
    (entry,) = attention_far_mass(model, val, train_length=L, ecfg=ecfg, windows=4)
    plan = window_plan(val.size, [L, T], "nonoverlap", ecfg)[T]
    firsts = np.flatnonzero(np.r_[True, plan.block[1:] != plan.block[:-1]])[:4]
    want = []
    for i in firsts:
        seen = []
        tokens = jnp.asarray(val[plan.starts[i]:plan.starts[i] + T][None], jnp.int32)
        model.hidden(tokens, impl="dense", observe=lambda layer, q, k, seen=seen, **_: seen.append(
            np.asarray(attention_weights(q, k, bias=None, q_pos=jnp.arange(T),
                                         k_pos=jnp.arange(T), scale=q.shape[-1] ** -0.5))))
        per = [[np.mean([p[0, h, i_, :i_ - L + 1].sum() for i_ in range(L, T)])
                for h in range(2)] for p in seen]
        want.append(per)
    want = np.asarray(want)
    np.testing.assert_allclose(entry["per_layer_head"], want.mean(0), atol=1e-5)
    assert entry["mean"] == pytest.approx(want.mean(), abs=1e-6)
    assert 0 < entry["mean"] < 1 and entry["ci"][0] <= entry["mean"] <= entry["ci"][1]


def test_table_coverage_counts_pairs_per_offset_and_untrained_buckets():
    cfg = ModelConfig(vocab_size=50, d_model=16, num_heads=2, num_layers=1)
    m = TransformerLM(cfg, "offset", {"size": 16}, rngs=nnx.Rngs(0))
    m0 = TransformerLM(cfg, "offset", {"size": 16}, rngs=nnx.Rngs(0))
    m.position.table[...] = m.position.table[...].at[:, 3].add(0.5)
    (cov,) = table_coverage(m, m0, train_length=8, train_steps=100)
    assert cov["pairs_per_window"] == [8 - k for k in range(8)] + [0] * 8
    assert cov["updates"] == [100] * 8 + [0] * 8
    assert cov["moved"][3] == pytest.approx(0.5) and cov["moved"][2] == 0
    t5 = TransformerLM(cfg, "t5", {"num_buckets": 8, "max_distance": 16}, rngs=nnx.Rngs(0))
    (cov,) = table_coverage(t5, t5, train_length=8, train_steps=10)
    assert cov["pairs_per_window"][-2:] == [0, 0]  # buckets of offsets >= 8: never trained


def run(label="alibi", seed=0, fp="aaaa", steps=100, run_dir="r"):
    return {"bias": label.split(" ")[0], "label": label, "seed": seed, "train_length": 16,
            "train_steps": steps, "dataset_fingerprint": fp, "run_dir": run_dir,
            "eval": [{"mode": "nonoverlap", "length": 16, "ppl": 5.0}]}


def test_plot_refuses_to_pool_unlike_runs():
    plots.check_poolable([run(seed=0), run(seed=1)])
    with pytest.raises(RelposError,
                       match=r"'alibi' differ in dataset_fingerprint \(aaaa vs bbbb\)"):
        plots.check_poolable([run(seed=0), run(seed=1, fp="bbbb")])
    with pytest.raises(RelposError, match=r"train_steps \(100 vs 200\)"):
        plots.check_poolable([run(seed=0), run(seed=1, steps=200)])
    with pytest.raises(RelposError, match="repeat seed 0"):
        plots.check_poolable([run(seed=0, run_dir="a"), run(seed=0, run_dir="b")])


def test_plot_merges_a_reevaluation_of_the_same_run_and_separates_other_labels(tmp_path):
    import json

    d = tmp_path / "run"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(run()))
    more = run()
    more["eval"] = [{"mode": "nonoverlap", "length": 64, "ppl": 6.0}]
    (d / "eval_results.json").write_text(json.dumps(more))
    pi = run(label="rope (interpolation=4)")
    (d / "eval_pi4.json").write_text(json.dumps(pi))
    (d / "bias_profile.json").write_text("{}")  # other JSON in a run folder is ignored
    runs = {r["label"]: r for r in plots.collect([str(tmp_path)])}
    assert sorted(runs) == ["alibi", "rope (interpolation=4)"]
    assert [e["length"] for e in runs["alibi"]["eval"]] == [16, 64]


def test_diagnostics_table_reports_far_mass_over_seeds_and_breakpoints():
    def run(seed, mass, brk):
        return {"label": "offset", "bias": "offset", "seed": seed, "train_length": 8,
                "attention_far_mass": [{"length": 32, "mean": mass}],
                "eval": [{"mode": "nonoverlap", "length": 8},
                         {"mode": "nonoverlap", "length": 32, "breakpoint": brk}]}

    table = plots.diagnostics_table([run(0, 0.1, 8), run(1, 0.3, None)])
    m, lo, hi = plots.seed_interval([0.1, 0.3])
    assert f"| offset | {m:.3f} [{lo:.3f}, {hi:.3f}] | 8, – |" in table
    assert "mass at 32" in table and "offsets >= 8" in table
    assert plots.diagnostics_table([{**run(0, 0, None), "attention_far_mass": [],
                                     "eval": []}]) == ""


def test_a_reevaluation_shows_its_own_bias_profile_or_none(tmp_path):
    import json

    d = tmp_path / "run"
    d.mkdir()
    (d / "bias_profile.json").write_text(json.dumps({"scheme": "offset", "offsets": [0],
                                                     "at_max": [[0.5]], "train_length": 8}))
    trained = {"label": "offset", "bias": "offset", "run_dir": str(d)}
    assert plots.profile_of(trained)["at_max"] == [[0.5]]
    masked = {**trained, "label": "offset (mask)", "bias_overrides": {"policy": "mask"}}
    assert plots.profile_of(masked) is None  # the saved profile is the trained policy's
    own = {**masked, "bias_profile": {"scheme": "offset", "offsets": [0, 9],
                                      "at_max": [[0.5, float("-inf")]], "train_length": 8}}
    assert plots.profile_of(own)["at_max"][0][1] == float("-inf")


def test_bias_profile_scale_follows_every_seed_drawn():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offsets = list(range(40))
    calm = {"scheme": "kerple_power", "offsets": offsets, "train_length": 8,
            "at_max": [[-0.01 * o for o in offsets]]}
    wild = {**calm, "at_max": [[-float(o) ** 3 for o in offsets]]}  # -59,319 at offset 39
    for others, scale in [((), "linear"), ((wild,), "symlog")]:
        fig, ax = plt.subplots()
        plots.bias_profile_figure(calm, ax=ax, others=others)
        assert ax.get_yscale() == scale  # the first seed alone would be linear
        plt.close(fig)


def test_key_window_table_pairs_each_masked_run_with_its_own_full_evaluation():
    def res(seed, label, losses, window=None):
        r = {"label": label, "bias": "alibi", "seed": seed, "train_length": 8,
             "run_dir": f"runs/s{seed}",
             "eval": [{"mode": "sliding", "length": 8 * k, "loss": v}
                      for k, v in zip((1, 4), losses)]}
        if window:
            r["key_window"] = window
        return r
    runs = [res(0, "alibi", [1.0, 1.10]), res(1, "alibi", [1.2, 1.30]),
            res(2, "alibi", [1.1, 1.20]),
            res(0, "alibi (keys < 8)", [1.0, 1.00], 8), res(1, "alibi (keys < 8)", [1.2, 1.25], 8),
            res(2, "alibi (keys < 8)", [1.1, 1.12], 8)]
    table = plots.key_window_table(runs)
    d = np.array([-0.10, -0.05, -0.08])  # masked minus full at 4x, per seed
    m, lo, hi = plots.seed_interval(d)
    row = next(line for line in table.splitlines() if line.startswith("| alibi | 8 | 3 |"))
    assert "+0.0000" in row and f"{m:+.4f} [{lo:+.4f}, {hi:+.4f}]" in row
    assert plots.key_window_table(runs[:3]) == ""  # nothing masked: no table
    # a merged file drops the folders: runs are told apart by what the re-evaluation
    # copies from them, and the masked label need not end in " (keys < W)"
    merged = []
    for i, r in enumerate(runs):
        r = {k: v for k, v in r.items() if k != "run_dir"}
        r.update(final_train_loss=1.5 + r["seed"], train_seconds=10.0 + r["seed"])
        if r.get("key_window"):
            r["label"] = "alibi, masked"
        merged.append(r)
    assert plots.key_window_table(merged) == table


def test_coinciding_curves_are_named_in_the_legend_and_drawn_apart():
    x = [82, 164, 328]
    curves = {"learned_abs": (x, [1.0, 0.531, 0.502]), "rope": (x, [1.0, 0.533, 0.501]),
              "alibi": (x, [0.894, 0.52, 0.50]), "none": (x[:2], [1.0, 0.531])}
    assert plots.coinciding(curves, tol=0.005) == {"rope": " = learned_abs"}
    assert plots.coinciding(curves, tol=0.001) == {}
    sizes = [plots.stacked(k, 3, 4, 1.5) for k in range(3)]
    assert sizes[-1] == {"ms": 4, "lw": 1.5}  # the last drawn is the base size
    assert sizes[0]["ms"] > sizes[1]["ms"] > sizes[2]["ms"]
    assert sizes[0]["lw"] > sizes[1]["lw"] > sizes[2]["lw"]


def test_one_figure_compares_runs_trained_at_several_lengths(tmp_path):
    """Runs at L = 64 and 128 (distinct labels): the table has absolute length columns and
    names both training lengths; the relative panel divides each run by its own L."""
    def run(label, L, ppls):
        ev = [{"mode": "nonoverlap", "length": n, "ppl": p, "loss": float(np.log(p))}
              for n, p in ppls.items()]
        return {"label": label, "bias": "alibi", "train_length": L, "seed": 0, "eval": ev,
                "dataset_fingerprint": "f"}
    rs = [run("alibi (L 64)", 64, {64: 6.0, 128: 5.9, 256: 5.8}),
          run("alibi (L 128)", 128, {64: 7.0, 128: 5.5, 256: 5.4})]
    table = plots.markdown_table(rs)
    assert "trained at 64, 128 (each label at one)" in table
    assert "| 64 | 128 | 256 |" in table and "(1x)" not in table
    g = plots.grouped(rs, "nonoverlap")
    _, mean, *_ = plots._curve(g, "alibi (L 128)", True, 128)
    np.testing.assert_allclose(mean, [7.0 / 5.5, 1.0, 5.4 / 5.5])
    plots.plot_ppl_vs_length(rs, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_every_variant_of_a_scheme_gets_its_own_line_and_marker():
    labels = ["alibi"] + [f"alibi (v{k})" for k in range(7)]
    kws = [plots.style(lab, labels) for lab in labels]
    pairs = {(str(kw["linestyle"]), kw["marker"]) for kw in kws}
    assert len(pairs) == len(labels)
    assert {kw["color"] for kw in kws} == {kws[0]["color"]}  # one colour per scheme
    assert kws[1]["marker"] == kws[0]["marker"]  # the first variants keep the scheme's marker


@pytest.mark.parametrize("figure", ["ppl", "position"])
def test_scheme_legend_sits_below_every_panel(monkeypatch, figure):
    """The legend of the perplexity and loss-by-position figures covers no curve: it is
    the figure's, and its box lies under the lowest panel."""
    edges = [0, 1, 2, 4, 8, 16, 32, 64, 128]
    def run(bias, seed):
        ev = [{"mode": m, "length": n, "ppl": 5.0 + n / 64, "loss": 1.6, "windows": 4,
               "position_bins": edges, "position_loss": [2.0 - 0.1 * k for k in range(8)],
               "position_excess": [0.0] * 6 + [0.1, 0.2]}
              for m in ("nonoverlap", "sliding") for n in (32, 64, 128)]
        return {"label": bias, "bias": bias, "train_length": 32, "seed": seed, "eval": ev,
                "dataset_fingerprint": "f"}
    rs = [run(b, s) for b in ("alibi", "rope", "offset", "t5", "none", "fire", "xpos")
          for s in (0, 1)]
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    draw = plots.plot_ppl_vs_length if figure == "ppl" else plots.plot_position_loss
    draw(rs, None)
    fig, = figs
    renderer = fig.canvas.get_renderer()
    legend, = fig.legends
    assert all(ax.get_legend() is None for ax in fig.axes)
    assert len(legend.get_texts()) == 7
    box = legend.get_window_extent(renderer)
    assert box.y1 < min(ax.get_tightbbox(renderer).y0 for ax in fig.axes)


def test_accuracy_legend_sits_under_each_column_and_names_hidden_curves(monkeypatch):
    """Each task column's legend lies under its lower panel; a curve hidden by another
    is named in it, per row when only one row hides it."""
    def run(bias, seed, acc, tok):
        ev = [{"mode": "task", "task": "copy", "length": n, "accuracy": a, "token_accuracy": t,
               "accuracy_ci": [0, 1], "token_accuracy_ci": [0, 1], "examples": 500,
               "chance": 0.0625} for n, a, t in zip((32, 64, 128), acc, tok)]
        return {"label": bias, "bias": bias, "train_length": 32, "seed": seed, "eval": ev,
                "task": "copy"}
    rs = [run("alibi", 0, [1, 0.5, 0.1], [1, 0.8, 0.4]),
          run("rope", 0, [1, 0.5, 0.1], [1, 0.3, 0.1]),  # alibi = rope in exact match only
          run("none", 0, [0, 0, 0], [0.1, 0.1, 0.1])]
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig))
    assert plots.plot_accuracy_vs_length(rs, None)
    fig, = figs
    renderer = fig.canvas.get_renderer()
    top, bottom = fig.axes
    legend = bottom.get_legend()
    assert top.get_legend() is None and legend is not None
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == ["none (1)", "rope (1)", "alibi (1) (exact = rope)", "chance per token"]
    # under the panel and its x label (the axes' tight box would include the legend)
    assert legend.get_window_extent(renderer).y1 < bottom.xaxis.label.get_window_extent(renderer).y0
    assert plots._same_note("rope", {"rope": " = alibi"}, {"rope": " = alibi"}) == " = alibi"
