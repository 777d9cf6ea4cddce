"""The outcome of a run: selected-epoch and last-epoch accuracies, as a dict, a terminal table and plots."""

from __future__ import annotations

import difflib

import matplotlib

matplotlib.use("Agg")  # runs write PNG files; no display needed

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table

from dmg.engine.loop import Metrics, selected_epoch
from dmg.errors import BadValue


def summarize(history: list[Metrics], averaged: Metrics | None = None) -> dict[str, float]:
    """Accuracies of the reported model (``selected/``) and of the last epoch (``last/``).

    Keys: ``selected_epoch`` (1-based), ``selected/val/acc/<source>``, ``selected/test/acc_mean``,
    ``last/test/acc/<target>``, ... Without averaging the reported model is the selected epoch's (best mean
    in-domain accuracy). With it (``averaged`` holds the averaged model's metrics) the reported model is the
    averaged one, the selected epoch's accuracies are kept as ``online/...`` and the averaged model's other
    metrics (range of epochs, mask overlaps, ...) as ``averaged/...``.
    """
    best = selected_epoch(history)
    summary: dict[str, float] = {"selected_epoch": best + 1, "epochs": len(history)}
    reported = {"selected": averaged, "online": history[best]} if averaged else {"selected": history[best]}
    for label, metrics in (reported | {"last": history[-1]}).items():
        summary.update({f"{label}/{key}": value for key, value in metrics.items() if "/acc" in key})
    if averaged:
        summary.update({f"averaged/{key}": value for key, value in averaged.items() if "/acc" not in key})
    return summary


def summary_by_step(summary: dict[str, float]) -> dict[int, dict[str, float]]:
    """The summary metrics grouped by the epoch (MLflow step) each one describes: ``selected/`` (without averaging)
    and ``online/`` the selected epoch, ``last/`` the last one, and the averaged model (``selected/`` and
    ``averaged/`` with averaging) the end of training, when the average is taken."""
    averaged = "online/val/acc_mean" in summary
    steps = {"last": summary["epochs"], "online": summary["selected_epoch"], "averaged": summary["epochs"]}
    steps["selected"] = summary["epochs"] if averaged else summary["selected_epoch"]
    grouped: dict[int, dict[str, float]] = {}
    for key, value in summary.items():
        if "/" in key:
            grouped.setdefault(steps[key.split("/")[0]], {})[key] = value
    return grouped


def summary_keys(evaluated: list[str], averaged: list[str] | None = None) -> list[str]:
    """The keys :func:`summarize` gives for epochs that log ``evaluated`` (and an averaged model logging
    ``averaged``): the metrics a run can report as its ``optimized_metric``, known before it trains."""
    shape = dict.fromkeys(evaluated, 0.0)
    return list(summarize([shape], dict.fromkeys(averaged, 0.0) if averaged is not None else None))


def check_optimized_metric(name: str, known: list[str]) -> None:
    """One line naming ``optimized_metric`` unless the run will log ``name`` among its summary metrics ``known``."""
    if name in known:
        return
    selected = [key for key in known if key.startswith("selected/")]
    close = _closest(name, known)
    hint = f"did you mean {close}? " if close else ""
    others = sorted({key.split("/")[0] + "/..." for key in known if "/" in key} - {"selected/..."})
    listing = f"it logs {', '.join(selected)}, and {', '.join(others)} (see its summary.json)"
    raise BadValue("optimized_metric", "a summary metric this run logs", name, hint + listing)


def _closest(name: str, known: list[str]) -> str | None:
    """The known key most like ``name``, compared whole and without its ``selected/``-like prefix; the first of
    equals (``selected/`` before ``last/``)."""

    def likeness(key: str) -> float:
        return max(difflib.SequenceMatcher(None, name, text).ratio() for text in (key, key.partition("/")[2]))

    best = max(known, key=likeness)
    return best if likeness(best) >= 0.6 else None


def print_summary(summary: dict[str, float], sources: list[str], targets: list[str], title: str) -> None:
    """A table with one row per domain: in-domain (sources) or out-of-domain (targets) accuracy."""
    averaged = "online/val/acc_mean" in summary
    best = f"selected epoch {summary['selected_epoch']} of {summary['epochs']} (best mean in-domain accuracy)"
    columns = {"selected": "selected epoch", "last": "last epoch"}
    if averaged:
        first, last = int(summary["averaged/first_epoch"]), int(summary["averaged/last_epoch"])
        best = f"weights averaged over epochs {first}-{last}; online model: {best}"
        columns = {"selected": "averaged", "online": "online, selected epoch", "last": "online, last epoch"}
    table = Table(title=title, caption=best)
    for column in ("domain", "role", *columns.values()):
        table.add_column(column, justify="left" if column in ("domain", "role") else "right")
    rows = [(name, "source (val)", f"val/acc/{name}") for name in sources] + [("mean", "in-domain", "val/acc_mean")]
    rows += [(name, "target (test)", f"test/acc/{name}") for name in targets] + [
        ("mean", "out-of-domain", "test/acc_mean")
    ]
    for name, role, key in rows:
        table.add_row(name, role, *(f"{100 * summary[f'{label}/{key}']:.2f}" for label in columns))
    Console().print(table)


def mask_overlap_figure(iou: torch.Tensor, domains: list[str], layer: str):
    """Heatmap of the hard-mask IoU between every pair of source domains for one masked layer."""
    figure, axes = plt.subplots(figsize=(1.2 * len(domains) + 2, 1.2 * len(domains) + 1.5))
    image = axes.imshow(iou.cpu().numpy(), vmin=0, vmax=1, cmap="viridis")
    axes.set_xticks(range(len(domains)), domains, rotation=45, ha="right")
    axes.set_yticks(range(len(domains)), domains)
    for i in range(len(domains)):
        for j in range(len(domains)):
            axes.text(j, i, f"{iou[i, j]:.2f}", ha="center", va="center", color="w" if iou[i, j] < 0.6 else "k")
    axes.set_title(f"mask IoU, layer {layer}")
    figure.colorbar(image, ax=axes, fraction=0.046)
    figure.tight_layout()
    return figure


def active_units_figure(history: list[Metrics], domains: list[str], layer: str):
    """Fraction of active units (p > 0.5) of each source domain's mask over the epochs, for one masked layer."""
    figure, axes = plt.subplots(figsize=(6, 4))
    epochs = range(1, len(history) + 1)
    for domain in domains:
        axes.plot(epochs, [metrics[f"mask/{layer}/active/{domain}"] for metrics in history], marker=".", label=domain)
    axes.set(xlabel="epoch", ylabel="active fraction", ylim=(0, 1.02), title=f"active units, layer {layer}")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure
