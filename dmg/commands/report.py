"""Paper-style results tables from the MLflow runs: one row per method, one column per target domain plus the average.

    python -m dmg report                                   # every experiment of sqlite:///mlflow.db
    python -m dmg report --experiment pacs --backbone resnet18 --format latex
    python -m dmg report --experiment pacs --selection oracle --overlap

Cells are mean ± standard deviation over seeds, in percent: out-of-domain accuracy (the target's test split) and
in-domain accuracy (the sources' validation splits), both at the epoch the model selection picks. Only FINISHED
runs count; runs of Optuna sweeps (their parent and trial runs) are left out unless asked for. A cell with fewer
seeds than the table's seeds says so, a cell without runs says "missing"; nothing is averaged silently.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from dmg.runs.tracking import BOOKKEEPING_KEYS
from dmg.sweeps.callbacks import PARENT_TAG

GROUP = ["dataset", "backbone"]  # one table per dataset and backbone
RUN_KEY = ["dataset", "backbone", "method", "setting", "target", "seed"]  # the full setting, never its label
PER_CELL = ("seed", "target", "sources", *BOOKKEEPING_KEYS)  # params that do not make a different setting
MAX_SHOWN = 3  # differing settings named in a row label
AVERAGE = "Avg"
MISSING = "missing"


@dataclass
class Selection:
    """A model-selection rule: which epoch of a run is reported, as (out-of-domain, in-domain) accuracies."""

    label: str
    accuracies: Callable[[MlflowClient, Run], tuple[float, float]]


def training_domain_validation(client: MlflowClient, run: Run) -> tuple[float, float]:
    """The paper's rule: the epoch with the best mean in-domain validation accuracy (the run's summary)."""
    return run.data.metrics["selected/test/acc_mean"], run.data.metrics["selected/val/acc_mean"]


def oracle(client: MlflowClient, run: Run) -> tuple[float, float]:
    """The epoch with the best target accuracy: an upper bound that peeks at the unseen domain."""
    test = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test/acc_mean")}
    val = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/acc_mean")}
    epoch = max(test, key=lambda step: (test[step], -step))  # the earliest of equally good epochs
    return test[epoch], val[epoch]


SELECTIONS = {
    "validation": Selection("training-domain validation", training_domain_validation),
    "oracle": Selection("oracle (best target accuracy over epochs; peeks at the target)", oracle),
}


def finished_runs(client: MlflowClient, experiments: list[str] | None, query: str = "") -> list[Run]:
    """Every FINISHED run of these experiments (all experiments when None) matching an MLflow filter string."""
    if experiments:
        found = {name: client.get_experiment_by_name(name) for name in experiments}
        unknown = [name for name, experiment in found.items() if experiment is None]
        if unknown:
            raise SystemExit(f"error: no MLflow experiment named {', '.join(unknown)}")
        ids = [experiment.experiment_id for experiment in found.values()]
    else:
        ids = [experiment.experiment_id for experiment in client.search_experiments()]
    query = " and ".join(filter(None, ["attributes.status = 'FINISHED'", query]))
    runs, token = [], None
    while True:
        page = client.search_runs(ids, query, max_results=1000, page_token=token)
        runs += page
        if not (token := page.token):
            return runs


def run_frame(
    client: MlflowClient, runs: Iterable[Run], selection: Selection, sweep_trials: bool = False
) -> pd.DataFrame:
    """One row per training run: its tags and its selected accuracies in percent (sweep runs left out by default)."""
    rows = []
    for run in runs:
        tags = run.data.tags
        is_trial = PARENT_TAG in tags
        if tags.get("sweep") or (is_trial and not sweep_trials) or "selected/test/acc_mean" not in run.data.metrics:
            continue
        ood, ind = selection.accuracies(client, run)
        rows.append(
            {key: tags.get(key, "?") for key in ("dataset", "backbone", "method", "target", "seed")}
            | {
                "setting": setting(run.data.params),
                "run_id": run.info.run_id,
                "start_time": run.info.start_time,
                "ood": 100 * ood,
                "ind": 100 * ind,
            }
        )
    columns = ["dataset", "backbone", "method", "target", "seed", "setting", "run_id", "start_time", "ood", "ind"]
    return label_rows(pd.DataFrame(rows, columns=columns))


def setting(params: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The run's config minus what varies from cell to cell (seed, target) and bookkeeping: runs with equal
    settings are seeds and targets of one experiment."""
    per_run = [key for key in params if key.split(".")[0] in PER_CELL or key.startswith("hp/")]  # hp/: a digest
    return tuple(sorted((key, value) for key, value in params.items() if key not in per_run))


def label_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The table row of each run: its method, plus the settings that differ when a method ran with several.

    Runs of one method that differ in anything but seed and target (other epochs, another data format) are never
    averaged together: each setting gets its own row, e.g. ``dmg [epochs=4]`` and ``dmg [epochs=20]``.
    """
    frame = frame.assign(row=frame.method)
    for _, group in frame.groupby(["dataset", "backbone", "method"]):
        settings = [dict(value) for value in group.setting.unique()]
        if len(settings) < 2:
            continue
        differing = sorted({key for one in settings for key in one if len({str(s.get(key)) for s in settings}) > 1})
        labels = {
            value: setting_label(group.method.iloc[0], dict(value), differing) for value in group.setting.unique()
        }
        shared = Counter(labels.values())
        for value, label in labels.items():  # a label cut short that two settings share: name every difference
            full = setting_label(group.method.iloc[0], dict(value), differing, len(differing))
            frame.loc[group.index[group.setting == value], "row"] = full if shared[label] > 1 else label
    return frame


def setting_label(method: str, named: dict, differing: list[str], shown: int = MAX_SHOWN) -> str:
    """``dmg [mask=scalar, method.overlap_lambda=0.1, +2 more]``: the method and the first differing settings."""
    listed = ", ".join(f"{key}={named.get(key)}" for key in differing[:shown])
    more = f", +{len(differing) - shown} more" if len(differing) > shown else ""
    return f"{method} [{listed}{more}]"


def latest_per_setting(frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The newest run of each (dataset, backbone, row, target, seed), and how many older duplicates were dropped."""
    latest = frame.sort_values("start_time").groupby(RUN_KEY, as_index=False).tail(1)
    return latest, len(frame) - len(latest)


@dataclass
class Cell:
    """Mean and sample standard deviation over ``seeds`` runs, out of the table's ``expected`` seeds."""

    mean: float | None
    std: float | None
    seeds: int
    expected: int


def cell(values: pd.Series, expected: int) -> Cell:
    if values.empty:
        return Cell(None, None, 0, expected)
    return Cell(values.mean(), values.std() if len(values) > 1 else None, len(values), expected)


def table(frame: pd.DataFrame, metric: str, methods: list[str] | None = None) -> pd.DataFrame:
    """Rows × (targets + Avg) cells of one dataset/backbone: a row per method (per setting where a method ran with
    several). Avg: per seed over targets, for seeds with every target."""
    seeds = sorted(frame.seed.unique())
    targets = sorted(frame.target.unique())
    grid = frame.pivot_table(index=["row", "seed"], columns="target", values=metric, aggfunc="first")
    rows = {}
    for method in methods or sorted(frame.method.unique()):
        for label in sorted(frame.row[frame.method == method].unique()) or [method]:
            by_seed = grid.loc[label] if label in grid.index.get_level_values(0) else pd.DataFrame(columns=targets)
            row = {target: cell(by_seed.get(target, pd.Series(dtype=float)).dropna(), len(seeds)) for target in targets}
            complete = by_seed.reindex(columns=targets).dropna()
            row[AVERAGE] = cell(complete.mean(axis=1), len(seeds))
            rows[label] = row
    return pd.DataFrame.from_dict(rows, orient="index", columns=[*targets, AVERAGE])


def mask_overlap(client: MlflowClient, frame: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, backbone and method, per masked layer: the mean hard-mask IoU between domains at the selected
    epoch (training-domain validation), averaged over runs. Methods without masks have no row."""
    rows = []
    for row in frame.itertuples():
        selected = client.get_metric_history(row.run_id, "selected/val/acc_mean")[-1].step
        keys = [
            key
            for key in client.get_run(row.run_id).data.metrics
            if key.startswith("mask/") and key.endswith("/iou_mean")
        ]
        for key in keys:
            history = {m.step: m.value for m in client.get_metric_history(row.run_id, key)}
            rows.append(
                {
                    "dataset": row.dataset,
                    "backbone": row.backbone,
                    "method": row.method,
                    "layer": key.split("/")[1],
                    "iou": history[selected],
                }
            )
    if not rows:
        return pd.DataFrame()
    return pd.DataFrame(rows).pivot_table(
        index=["dataset", "backbone", "method"], columns="layer", values="iou", aggfunc="mean"
    )


def format_cell(value: Cell) -> str:
    """``81.20 ± 0.40``; ``[2/3 seeds]`` when seeds are missing; ``missing`` without runs."""
    if value.mean is None:
        return MISSING
    text = f"{value.mean:.2f}" + (f" ± {value.std:.2f}" if value.std is not None else "")
    return text + (f" [{value.seeds}/{value.expected} seeds]" if value.seeds < value.expected else "")


def markdown(cells: pd.DataFrame, title: str) -> str:
    header = ["method", *cells.columns]
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in cells.iterrows():
        lines.append("| " + " | ".join([method, *(format_cell(value) for value in row)]) + " |")
    return "\n".join(lines)


def latex(cells: pd.DataFrame, title: str) -> str:
    escape = lambda text: text.replace("_", r"\_").replace("±", r"$\pm$").replace("%", r"\%")  # noqa: E731
    lines = [f"% {title}", r"\begin{tabular}{l" + "c" * len(cells.columns) + "}", r"\toprule"]
    lines.append(" & ".join(escape(name) for name in ["method", *cells.columns]) + r" \\")
    lines.append(r"\midrule")
    for method, row in cells.iterrows():
        lines.append(" & ".join(escape(text) for text in [method, *(format_cell(value) for value in row)]) + r" \\")
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"])


def tidy(cells: pd.DataFrame, **labels: str) -> pd.DataFrame:
    """The table as CSV rows: one per method and column, with mean, std and seed counts as numbers."""
    rows = [
        labels
        | {
            "method": method,
            "target": target,
            "mean": value.mean,
            "std": value.std,
            "seeds": value.seeds,
            "expected_seeds": value.expected,
        }
        for method, row in cells.iterrows()
        for target, value in row.items()
    ]
    return pd.DataFrame(rows)


METRICS = {
    "ood": "out-of-domain accuracy (%) on the target's test split",
    "ind": "in-domain accuracy (%) on the sources' validation splits",
}
RENDER = {"markdown": markdown, "latex": latex}


def report(frame: pd.DataFrame, selection: Selection, style: str, methods: list[str] | None = None) -> str:
    """Every table (out-of-domain and in-domain, per dataset and backbone) with a legend, as markdown, LaTeX or CSV."""
    parts, records = [], []
    for (dataset, backbone), group in frame.groupby(GROUP):
        seeds = ", ".join(sorted(group.seed.unique()))
        for metric, description in METRICS.items():
            cells = table(group, metric, methods)
            title = f"{dataset}, {backbone}: {description}; model selection: {selection.label}; mean ± std over seeds {seeds}"
            if style == "csv":
                records.append(
                    tidy(cells, dataset=dataset, backbone=backbone, metric=metric, selection=selection.label)
                )
            else:
                parts.append(RENDER[style](cells, title))
    if style == "csv":
        return pd.concat(records).to_csv(index=False, float_format="%.4f") if records else ""
    legend = (
        f"[k/n seeds]: only k of the table's n seeds have a finished run; {MISSING}: none has. "
        f"{AVERAGE}: the mean over targets of each seed that has every target, then mean ± std over those seeds."
    )
    return "\n\n".join([*parts, ("% " if style == "latex" else "") + legend]) + "\n"


def overlap_report(client: MlflowClient, frame: pd.DataFrame) -> str:
    overlap = mask_overlap(client, frame)
    if overlap.empty:
        return "no run logged mask overlaps\n"
    lines = [
        "### mean hard-mask IoU between source domains at the selected epoch (mean over runs), per masked layer",
        "",
    ]
    lines += [
        "| dataset | backbone | method | " + " | ".join(overlap.columns) + " |",
        "|" + "---|" * (len(overlap.columns) + 3),
    ]
    for names, row in overlap.iterrows():
        lines.append(
            "| " + " | ".join([*names, *(f"{value:.3f}" if value == value else MISSING for value in row)]) + " |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dmg report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--experiment", action="append", help="MLflow experiment (repeatable; default: all)")
    parser.add_argument("--method", action="append", help="keep these methods, rows in this order (repeatable)")
    parser.add_argument("--backbone", action="append", help="keep these backbones (repeatable)")
    parser.add_argument(
        "--tag", action="append", default=[], metavar="KEY=VALUE", help="keep runs with this tag (repeatable)"
    )
    parser.add_argument("--filter", default="", help="an MLflow filter string, e.g. \"params.epochs = '150'\"")
    parser.add_argument(
        "--selection", choices=SELECTIONS, default="validation", help="model selection (default: validation)"
    )
    parser.add_argument("--format", choices=["markdown", "latex", "csv"], default="markdown")
    parser.add_argument("--include-sweep-trials", action="store_true", help="count the trial runs of Optuna sweeps too")
    parser.add_argument("--overlap", action="store_true", help="add the mean mask overlap (IoU) per method and layer")
    return parser.parse_args(argv)


def tag_query(args: argparse.Namespace) -> str:
    """The MLflow filter for --tag, --method and --backbone (a single value each; lists are filtered afterwards)."""
    pairs = [tag.split("=", 1) for tag in args.tag]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit("error: --tag expects KEY=VALUE")
    return " and ".join([f"tags.`{key}` = '{value}'" for key, value in pairs] + ([args.filter] if args.filter else []))


def wanted(run: Run, args: argparse.Namespace) -> bool:
    """Whether the run's method and backbone are among those asked for (all when none is)."""
    tags = run.data.tags
    return all(
        not chosen or tags.get(key) in chosen for key, chosen in (("method", args.method), ("backbone", args.backbone))
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    client = MlflowClient(args.tracking_uri)
    selection = SELECTIONS[args.selection]
    runs = [run for run in finished_runs(client, args.experiment, tag_query(args)) if wanted(run, args)]
    frame = run_frame(client, runs, selection, args.include_sweep_trials)
    frame, duplicates = latest_per_setting(frame)
    if frame.empty:
        trials = not args.include_sweep_trials and any(PARENT_TAG in run.data.tags for run in runs)
        hint = "; only sweep trials match: add --include-sweep-trials to count them" if trials else ""
        raise SystemExit(f"error: no finished run matches (check --tracking-uri, --experiment and the filters){hint}")
    sys.stdout.write(report(frame, selection, args.format, args.method))
    if duplicates:
        note = f"{duplicates} older run(s) of an already covered setting were ignored (the newest counts).\n"
        if args.format == "csv":
            sys.stderr.write(note)  # the CSV stays a table; the note goes beside it
        else:
            sys.stdout.write(f"\n{'% ' if args.format == 'latex' else ''}{note}")
    if args.overlap and args.format != "csv":
        sys.stdout.write("\n" + overlap_report(client, frame))


if __name__ == "__main__":
    main()
