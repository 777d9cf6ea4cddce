"""The results table: mean ± std over seeds per method and target, missing cells and seeds said so, run filters,
oracle selection and output formats, on MLflow runs written by the test (their metrics as dmg.runs.experiment logs them)."""

from __future__ import annotations

import statistics

import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from dmg.commands import report

# accuracies per epoch (test/acc_mean, val/acc_mean); the selected epoch is the one with the best val
HISTORY = {
    ("aggregate", "rot0", "0"): ([0.50, 0.60, 0.70], [0.80, 0.90, 0.85]),
    ("aggregate", "rot0", "1"): ([0.52, 0.64, 0.61], [0.81, 0.92, 0.91]),
    ("aggregate", "rot0", "2"): ([0.55, 0.58, 0.66], [0.70, 0.75, 0.95]),
    ("dmg", "rot0", "0"): ([0.60, 0.72, 0.71], [0.85, 0.93, 0.90]),
    ("dmg", "rot0", "1"): ([0.61, 0.70, 0.74], [0.86, 0.94, 0.95]),
    ("dmg", "rot0", "2"): ([0.65, 0.69, 0.73], [0.84, 0.96, 0.93]),
    ("dmg", "rot75", "0"): ([0.40, 0.45, 0.42], [0.80, 0.90, 0.91]),
    ("dmg", "rot75", "1"): ([0.41, 0.47, 0.49], [0.83, 0.89, 0.87]),
}  # aggregate has no rot75 run, dmg has no rot75 run of seed 2


def log_run(client, experiment, method, target, seed, test, val, status="FINISHED", backbone="small_cnn", **tags):
    """A run as dmg.runs.experiment logs it: per-epoch metrics at step = epoch, summary metrics at the selected epoch."""
    tags = {"method": method, "target": target, "seed": seed, "backbone": backbone, "dataset": "rotated_mnist", **tags}
    run_id = client.create_run(experiment, tags=tags).info.run_id
    selected = max(range(len(val)), key=lambda i: (val[i], -i)) + 1
    metrics = [Metric("test/acc_mean", t, 0, epoch) for epoch, t in enumerate(test, 1)]
    metrics += [Metric("val/acc_mean", v, 0, epoch) for epoch, v in enumerate(val, 1)]
    metrics += (
        [Metric("mask/fc/iou_mean", 0.1 * epoch, 0, epoch) for epoch in range(1, len(test) + 1)]
        if method == "dmg"
        else []
    )
    metrics += [
        Metric("selected/test/acc_mean", test[selected - 1], 0, selected),
        Metric("selected/val/acc_mean", val[selected - 1], 0, selected),
    ]
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, status)
    return run_id


def selected(test, val):
    epoch = max(range(len(val)), key=lambda i: (val[i], -i))
    return 100 * test[epoch], 100 * val[epoch]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The runs of HISTORY plus runs that must not count: failed, sweep parent and trial, another backbone, an older duplicate."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('report')}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("rotated_mnist")
    log_run(client, experiment, "dmg", "rot75", "1", [0.1] * 3, [0.1] * 3)  # older duplicate of dmg/rot75/1
    for (method, target, seed), (test, val) in HISTORY.items():
        log_run(client, experiment, method, target, seed, test, val)
    log_run(client, experiment, "dmg", "rot75", "2", [0.9] * 3, [0.9] * 3, status="FAILED")
    parent = client.create_run(experiment, tags={"sweep": "optuna", "study": "s"}).info.run_id
    log_run(
        client, experiment, "dmg", "rot75", "2", [0.9] * 3, [0.9] * 3, **{"mlflow.parentRunId": parent, "trial": "0"}
    )
    log_run(client, experiment, "dmg", "rot0", "0", [0.2] * 3, [0.2] * 3, backbone="resnet18")
    return uri


def test_table_is_mean_and_std_over_seeds_and_says_what_is_missing(tracked, capsys):
    report.main(["--tracking-uri", tracked, "--backbone", "small_cnn"])
    out = capsys.readouterr().out
    ood = {key: selected(*history)[0] for key, history in HISTORY.items()}
    dmg_rot0 = [ood["dmg", "rot0", seed] for seed in "012"]
    dmg_rot75 = [ood["dmg", "rot75", seed] for seed in "01"]
    agg_rot0 = [ood["aggregate", "rot0", seed] for seed in "012"]
    dmg_avg = [(ood["dmg", "rot0", seed] + ood["dmg", "rot75", seed]) / 2 for seed in "01"]  # seeds with every target
    expected_dmg = (
        f"| dmg | {statistics.mean(dmg_rot0):.2f} ± {statistics.stdev(dmg_rot0):.2f} "
        f"| {statistics.mean(dmg_rot75):.2f} ± {statistics.stdev(dmg_rot75):.2f} [2/3 seeds] "
        f"| {statistics.mean(dmg_avg):.2f} ± {statistics.stdev(dmg_avg):.2f} [2/3 seeds] |"
    )
    expected_aggregate = (
        f"| aggregate | {statistics.mean(agg_rot0):.2f} ± {statistics.stdev(agg_rot0):.2f} | missing | missing |"
    )
    ood_table = out.split("### ")[1]
    assert "out-of-domain" in ood_table and "training-domain validation" in ood_table and "seeds 0, 1, 2" in ood_table
    assert "| method | rot0 | rot75 | Avg |" in ood_table
    assert expected_dmg in ood_table and expected_aggregate in ood_table
    ind = [selected(*HISTORY["aggregate", "rot0", seed])[1] for seed in "012"]
    assert (
        f"| aggregate | {statistics.mean(ind):.2f} ± {statistics.stdev(ind):.2f} | missing | missing |"
        in out.split("### ")[2]
    )
    assert "resnet18" not in out and "1 older run(s)" in out


def test_oracle_selection_takes_each_runs_best_target_epoch_and_says_so(tracked, capsys):
    report.main(
        [
            "--tracking-uri",
            tracked,
            "--selection",
            "oracle",
            "--method",
            "dmg",
            "--tag",
            "backbone=small_cnn",
            "--format",
            "csv",
        ]
    )
    rows = [line.split(",") for line in capsys.readouterr().out.strip().splitlines()]
    header, rows = rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]
    assert header == [
        "dataset",
        "backbone",
        "metric",
        "selection",
        "method",
        "target",
        "mean",
        "std",
        "seeds",
        "expected_seeds",
    ]
    cell = next(row for row in rows if row["metric"] == "ood" and row["target"] == "rot0")
    best = [100 * max(HISTORY["dmg", "rot0", seed][0]) for seed in "012"]
    assert float(cell["mean"]) == pytest.approx(statistics.mean(best), abs=1e-4)
    assert float(cell["std"]) == pytest.approx(statistics.stdev(best), abs=1e-4)
    assert cell["selection"].startswith("oracle") and (cell["seeds"], cell["expected_seeds"]) == ("3", "3")
    assert {row["method"] for row in rows} == {"dmg"}


def test_latex_output_and_mask_overlap_per_method(tracked, capsys):
    report.main(
        ["--tracking-uri", tracked, "--experiment", "rotated_mnist", "--backbone", "small_cnn", "--format", "latex"]
    )
    out = capsys.readouterr().out
    assert r"\begin{tabular}{lccc}" in out and r"$\pm$" in out and "method & rot0 & rot75 & Avg" in out
    report.main(["--tracking-uri", tracked, "--backbone", "small_cnn", "--method", "dmg", "--overlap"])
    overlap = capsys.readouterr().out.split("mean hard-mask IoU")[1]
    # the fc IoU logged at each dmg run's selected epoch (0.1 * epoch), averaged over the runs
    epochs = [
        max(range(3), key=lambda i: (val[i], -i)) + 1 for (method, _, _), (_, val) in HISTORY.items() if method == "dmg"
    ]
    assert f"| rotated_mnist | small_cnn | dmg | {statistics.mean(0.1 * epoch for epoch in epochs):.3f} |" in overlap


def test_sweep_trials_count_only_when_asked_and_bad_filters_say_why(tracked, capsys):
    report.main(
        [
            "--tracking-uri",
            tracked,
            "--backbone",
            "small_cnn",
            "--method",
            "dmg",
            "--include-sweep-trials",
            "--format",
            "csv",
        ]
    )
    rows = capsys.readouterr().out.splitlines()
    assert any(
        row.startswith("rotated_mnist,small_cnn,ood,training-domain validation,dmg,rot75,") and row.endswith(",3,3")
        for row in rows
    )
    with pytest.raises(SystemExit, match="no MLflow experiment named pacs"):
        report.main(["--tracking-uri", tracked, "--experiment", "pacs"])
    with pytest.raises(SystemExit, match="no finished run matches"):
        report.main(["--tracking-uri", tracked, "--method", "multihead"])


def test_runs_that_differ_in_more_than_seed_and_target_get_their_own_rows(tmp_path, capsys):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("rotated_mnist")
    for epochs, accuracy in (("4", 0.5), ("20", 0.9)):
        for seed in "01":
            run_id = log_run(client, experiment, "dmg", "rot0", seed, [accuracy] * 3, [accuracy] * 3)
            params = {"epochs": epochs, "seed": seed, "target": "rot0", "method.overlap_lambda": "0.1"}
            params["tracking.run_name"] = f"run-{seed}"  # bookkeeping: never a setting of its own
            client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
    report.main(["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    ood = capsys.readouterr().out.split("### ")[1]
    assert "| dmg [epochs=20] | 90.00 ± 0.00 | 90.00 ± 0.00 |" in ood
    assert "| dmg [epochs=4] | 50.00 ± 0.00 | 50.00 ± 0.00 |" in ood


def test_runs_are_keyed_by_their_full_setting_never_by_a_label_cut_short():
    mask = {"scalar": {"mask.name": "scalar", "mask.a": "1", "mask.b": "2"}}
    mask["random_uniform"] = {"mask.name": "random_uniform", "mask.a": "3", "mask.b": "4"}
    settings = [("scalar", "0.1"), ("scalar", "1.0"), ("random_uniform", "0.1")]
    rows = [
        {"dataset": "d", "backbone": "b", "method": "dmg", "target": "t", "seed": "0", "run_id": str(number)}
        | {"setting": report.setting(mask[kind] | {"method.overlap_lambda": weight}), "start_time": number}
        | {"ood": float(number), "ind": float(number)}
        for number, (kind, weight) in enumerate(settings)
    ]
    frame, duplicates = report.latest_per_setting(report.label_rows(report.pd.DataFrame(rows)))
    assert duplicates == 0 and len(frame) == 3 and frame.row.nunique() == 3  # three settings, three rows
    cells = report.table(frame, "ood")
    assert sorted(cells[report.AVERAGE].map(lambda cell: cell.mean)) == [0.0, 1.0, 2.0]


def test_a_store_with_only_sweep_trials_names_the_option_that_counts_them(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.create_experiment("e")
    run = client.create_run(experiment, tags={"mlflow.parentRunId": "p", "method": "dmg"})
    client.log_metric(run.info.run_id, "selected/test/acc_mean", 0.5)
    client.set_terminated(run.info.run_id)
    with pytest.raises(SystemExit, match="only sweep trials match: add --include-sweep-trials"):
        report.main(["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
