"""`plot_run`: the figures a paper needs (titles, units, integer rounds, no "1e6" offset, ε with δ and its budget,
train and test loss together, accuracy against MB uploaded), on logs as the planes write them, old names and new."""

from __future__ import annotations

import json
import re

import pytest
import tomli_w

from plait.experiment.plots import Figure, mark_baselines, plot_run, run_figures
from plait.runtime.metric_names import DATA_PARALLEL, FEDERATED, canonical_records, plane_of


def write_run(run, records, config=None):
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (run / "config.toml").write_bytes(tomli_w.dumps(config).encode())
    return run


def five_rounds(old_names=True):
    """A 5-round federated log evaluated only at the end, as `eval_every = 0` writes it."""
    records = []
    for r in range(1, 6):
        record = {"round": r, "selected": 3, "participants": 3 if r != 2 else 2, "dropped": int(r == 2),
                  "bytes_up": 1_200_000, "bytes_down": 1_800_000, "train_loss": 2.0 / r, "epsilon": 0.4 * r,
                  "elapsed_s": 0.5 * r}
        records.append(record)
    test = {"accuracy": 0.75, "loss": 0.8} if old_names else {"test_accuracy": 0.75, "test_loss": 0.8}
    records[-1].update(test, fed_accuracy=0.7, fed_loss=0.9)
    return records


DP_CONFIG = {"run": {"name": "fl5"}, "fl": {"rounds": 5, "privacy": {"delta": 1e-5, "epsilon_budget": 3.0}}}


def svg_text(path):
    """The texts of an SVG written with svg.fonttype = none: titles, labels, tick labels."""
    return re.findall(r"<text[^>]*>([^<]*)</text>", path.with_suffix(".svg").read_text())


def x_ticks(path):
    """The x-axis tick labels of an SVG matplotlib wrote (each tick is a group named xtick_N)."""
    chunks = path.with_suffix(".svg").read_text().split('id="xtick_')[1:]
    return [re.search(r"<text[^>]*>([^<]*)</text>", chunk).group(1) for chunk in chunks]


def test_a_five_round_run_draws_every_figure_with_titles_units_and_integer_rounds(tmp_path):
    run = write_run(tmp_path / "fl5", five_rounds(), DP_CONFIG)
    written = plot_run(run)
    assert [p.name for p in written] == ["accuracy.png", "loss.png", "traffic.png", "participation.png",
                                         "epsilon.png", "accuracy_vs_mb.png", "accuracy_vs_time.png"]
    assert all(p.stat().st_size > 0 and p.with_suffix(".svg").exists() for p in written)
    loss = svg_text(run / "plots" / "loss.png")
    assert "fl5: loss" in loss and "round" in loss and {"training", "test", "federated"} <= set(loss)
    for name in ("loss", "accuracy", "participation", "epsilon"):  # rounds 1..5, never 1.5 or a lone tick
        assert x_ticks(run / "plots" / f"{name}.png") == ["1", "2", "3", "4", "5"], name
    traffic = svg_text(run / "plots" / "traffic.png")
    assert "MB so far" in traffic and "6" in traffic and not any("1e" in t for t in traffic)  # 6 MB, no offset
    epsilon = svg_text(run / "plots" / "epsilon.png")
    assert "fl5: privacy spent (δ = 1e-05)" in epsilon and "budget ε = 3" in epsilon
    assert "test accuracy (%)" in svg_text(run / "plots" / "accuracy_vs_mb.png")
    assert "uploaded so far (MB)" in svg_text(run / "plots" / "accuracy_vs_mb.png")
    accuracy = svg_text(run / "plots" / "accuracy.png")
    assert "accuracy (%)" in accuracy and "test (last 75)" in accuracy and "federated (last 70)" in accuracy


def test_a_run_with_baselines_draws_them_beside_its_accuracy(tmp_path):
    run = write_run(tmp_path / "fl5", five_rounds(old_names=False), DP_CONFIG)
    (run / "baselines.json").write_text(json.dumps({
        "local_epochs": 2, "local_accuracy_mean": 0.4, "local_accuracy_p10": 0.3, "local_accuracy_p90": 0.55,
        "central_epochs": 2, "central_accuracy": 0.9, "fl_accuracy": 0.75}))
    accuracy = run_figures("fl5", canonical_records(five_rounds(old_names=False), FEDERATED), DP_CONFIG,
                           json.loads((run / "baselines.json").read_text()))["accuracy"]
    assert accuracy.hlines == [(90.0, "one model on all the data, 2 epochs (90)"),
                               (40.0, "each client alone, 2 epochs, mean (40)")]
    assert accuracy.bands == [(30.0, pytest.approx(55.0), "each client alone, p10-p90")]
    plot_run(run)
    drawn = svg_text(run / "plots" / "accuracy.png")
    assert {"one model on all the data, 2 epochs (90)", "each client alone, 2 epochs, mean (40)",
            "each client alone, p10-p90"} <= set(drawn)
    (run / "baselines.json").write_text("{not json")  # a cut file: the figure is drawn without them
    plot_run(run)
    assert "each client alone, 2 epochs, mean (40)" not in svg_text(run / "plots" / "accuracy.png")
    own_rate = Figure("f", "round", "accuracy", [])
    mark_baselines(own_rate, {"central_accuracy": 0.9, "central_epochs": 2, "central_lr": 0.05})
    assert own_rate.hlines == [(90.0, "one model on all the data, 2 epochs, lr 0.05 (90)")]  # not the clients' rate


def test_old_and_new_metric_names_draw_the_same_figures(tmp_path):
    old = run_figures("r", canonical_records(five_rounds(old_names=True), FEDERATED), DP_CONFIG)
    new = run_figures("r", canonical_records(five_rounds(old_names=False), FEDERATED), DP_CONFIG)
    assert old == new
    accuracy_vs_mb = old["accuracy_vs_mb"].lines
    assert accuracy_vs_mb == [("test", [(6.0, 75.0)])]  # 5 rounds × 1.2 MB uploaded, 75 %
    assert old["participation"].lines[2] == ("dropped", [(1, 0.0), (2, 1.0), (3, 0.0), (4, 0.0), (5, 0.0)])


def test_data_parallel_logs_per_rank_bytes_and_a_training_loss(tmp_path):
    records = [{"step": s, "loss": 1.0 / s, "bytes_sent": [100_000, 300_000], "bytes_recv": [200_000, 200_000],
                "samples_per_s": 500.0, "elapsed_s": s * 0.1} for s in (10, 20)]
    config = {"run": {"name": "dp"}, "parallel": {"mode": "data"}, "sync": {"kind": "allreduce"}}
    assert plane_of(config, records) == DATA_PARALLEL
    rows = canonical_records(records, DATA_PARALLEL)
    assert rows[1]["bytes_up"] == 400_000 and rows[1]["cumulative_bytes_up"] == 800_000
    assert rows[0]["train_loss"] == 1.0 / 10 and "test_loss" not in rows[0]  # its loss is the training loss
    written = plot_run(write_run(tmp_path / "dp", records, config))
    assert [p.name for p in written] == ["loss.png", "traffic.png", "throughput.png"]
    assert "training" in svg_text(written[0]) and "step" in svg_text(written[0])


def test_the_canonical_name_wins_over_its_alias_and_unknown_planes_keep_loss(tmp_path):
    assert canonical_records([{"round": 1, "accuracy": 0.1, "test_accuracy": 0.2}], FEDERATED)[0] == \
        {"round": 1, "test_accuracy": 0.2}
    assert plane_of({}, [{"step": 1, "loss": 1.0}]) is None
    assert canonical_records([{"step": 1, "loss": 1.0}], None) == [{"step": 1, "loss": 1.0}]


def test_a_log_that_starts_with_an_event_still_plots(tmp_path):
    # a PS run whose worker died before the first evaluation: its log opens with the launcher's event
    records = [{"event": "worker_restarted", "worker": 1, "exit_code": 3},
               {"step": 1, "loss": 2.0, "accuracy": 0.1}, {"step": 2, "loss": 1.5, "accuracy": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    written = plot_run(tmp_path, ("loss", "accuracy"))
    assert [p.name for p in written] == ["loss.png", "accuracy.png"] and all(p.stat().st_size > 0 for p in written)


def test_a_log_without_any_axis_key_is_refused_by_name(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "x"}) + "\n")
    with pytest.raises(ValueError, match="none of the axis keys"):
        plot_run(tmp_path)


def test_plait_plot_lists_what_it_drew(tmp_path):

    from tests_support import run_plait

    run = write_run(tmp_path / "fl5", five_rounds(), DP_CONFIG)
    result = run_plait("plot", str(run))
    assert result.exit_code == 0, result.output
    printed = result.output.replace("\n", "")  # rich wraps long paths
    assert printed.count("plot: ") == 7 and "plots/accuracy_vs_mb.png" in printed
    assert (run / "plots" / "epsilon.svg").exists()
    missing = run_plait("plot", str(tmp_path / "nowhere"))
    assert missing.exit_code != 0 and "no metrics in" in missing.output
