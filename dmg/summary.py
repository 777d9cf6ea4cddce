"""The outcome of a run: selected-epoch and last-epoch accuracies, as a dict, a terminal table and plots."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # runs write PNG files; no display needed

import matplotlib.pyplot as plt
import torch
from matplotlib.ticker import MaxNLocator
from rich.console import Console
from rich.table import Table

from dmg.loop import Metrics, selected_epoch


def summarize(history: list[Metrics]) -> dict[str, float]:
    """Accuracies at the selected epoch (best mean in-domain accuracy) and at the last epoch.

    Keys: ``selected_epoch`` (1-based), ``selected/val/acc/<source>``, ``selected/test/acc_mean``,
    ``last/test/acc/<target>``, ...
    """
    best = selected_epoch(history)
    summary: dict[str, float] = {"selected_epoch": best + 1, "epochs": len(history)}
    for label, metrics in (("selected", history[best]), ("last", history[-1])):
        summary.update({f"{label}/{key}": value for key, value in metrics.items() if "/acc" in key})
    return summary


def print_summary(summary: dict[str, float], sources: list[str], targets: list[str], title: str) -> None:
    """A table with one row per domain: in-domain (sources) or out-of-domain (targets) accuracy."""
    table = Table(
        title=title,
        caption=f"selected epoch {summary['selected_epoch']} of {summary['epochs']} (best mean in-domain accuracy)",
    )
    for column in ("domain", "role", "selected epoch", "last epoch"):
        table.add_column(column, justify="left" if column in ("domain", "role") else "right")
    rows = [(name, "source (val)", f"val/acc/{name}") for name in sources] + [("mean", "in-domain", "val/acc_mean")]
    rows += [(name, "target (test)", f"test/acc/{name}") for name in targets] + [
        ("mean", "out-of-domain", "test/acc_mean")
    ]
    for name, role, key in rows:
        table.add_row(name, role, f"{100 * summary[f'selected/{key}']:.2f}", f"{100 * summary[f'last/{key}']:.2f}")
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
