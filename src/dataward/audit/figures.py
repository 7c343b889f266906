"""Figures of the audit report: matplotlib (Agg backend) drawings returned as ``<img>`` tags with base64 PNG data URIs,
so the page needs no other file and no network. Images are (N, C, H, W) in [-1, 1]."""

from __future__ import annotations

import base64
import io

import numpy as np
import torch

from dataward.audit.metrics import Replication
from dataward.plots import PALETTE, Row, draw_rows, image_grid

# line style per (denoiser, attack) in the ROC figures; the colour is the compartment's
ROC_STYLES = {("raw", "loss"): "-", ("raw", "pia"): ":", ("guarded", "loss"): "--", ("guarded", "pia"): "-."}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 110})
    return plt


def _png(fig) -> str:
    """A matplotlib figure as an ``<img>`` tag with a base64 PNG data URI (the figure is closed)."""
    plt = _plt()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return _img(buffer.getvalue())


def _img(png: bytes) -> str:
    """PNG bytes as an ``<img>`` tag with a base64 data URI."""
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def rows_figure(rows: list[Row], caption: str) -> str:
    """Labelled rows of images (:func:`dataward.plots.draw_rows`) as an ``<img>`` tag: pixels as sampled, not resampled."""
    buffer = io.BytesIO()
    draw_rows(rows, buffer, caption=caption)
    return _img(buffer.getvalue())


def class_grid_figure(images: torch.Tensor, labels: torch.Tensor | None, caption: str, attribution: torch.Tensor | None = None) -> str:
    """Images (N, C, H, W) in [-1, 1] as a grid with one labelled row per class and, with ``attribution`` (N, K), each
    sample's shares per compartment under it (:func:`dataward.plots.image_grid`)."""
    buffer = io.BytesIO()
    image_grid((images.float().clamp(-1, 1) + 1) / 2, buffer, labels, caption=caption, attribution=attribution)
    return _img(buffer.getvalue())


def attribution_figure(attribution: torch.Tensor, compartments: list[int], shown: int = 48) -> str:
    """Mean attribution per compartment, and stacked per-sample attribution bars for the first ``shown`` samples."""
    plt = _plt()
    a = attribution.detach().float().numpy()  # (N, K)
    k = a.shape[1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 2.6), gridspec_kw={"width_ratios": [1, 3]})
    left.bar([str(c) for c in compartments[:k]], a.mean(0), color=[PALETTE[i % len(PALETTE)] for i in range(k)])
    left.set_ylim(0, 1)
    left.set_xlabel("compartment")
    left.set_ylabel("mean attribution")
    bottom = np.zeros(min(shown, len(a)))
    for i in range(k):
        right.bar(np.arange(len(bottom)), a[: len(bottom), i], bottom=bottom, color=PALETTE[i % len(PALETTE)], width=0.9, label=f"compartment {compartments[i]}")
        bottom += a[: len(bottom), i]
    right.set_xlabel("sample")
    right.set_ylabel("attribution")
    right.set_ylim(0, 1)
    right.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    fig.tight_layout()
    return _png(fig)


def roc_figure(curves: list[tuple[str, dict, int, str]], title: str) -> str:
    """ROC curves (linear and log-log) from attack summaries ``(label, summary, compartment, line style)``, with the
    chance diagonal; one colour per compartment."""
    plt = _plt()
    from matplotlib.ticker import NullLocator

    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6))
    for ax, log in zip(axes, (False, True)):
        grid = np.logspace(-3, 0, 50) if log else np.linspace(0, 1, 50)
        ax.plot(grid, grid, color="#aaaaaa", linestyle="--", linewidth=1, label="chance")
        for label, summary, compartment, style in curves:
            fpr, tpr = np.asarray(summary["roc"]["fpr"]), np.asarray(summary["roc"]["tpr"])
            few = f", only {summary['n_members']} member(s): a step, not a curve" if summary.get("n_members", 99) < 10 else ""
            ax.plot(fpr, tpr, style, color=PALETTE[compartment % len(PALETTE)], linewidth=1.6,
                    label=f"{label}  AUC {summary['auc']:.3f}, t={summary['best_t']}{few}")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(1e-3, 1)
            ax.set_ylim(1e-3, 1.05)
            ax.axvline(0.01, color="#cc4444", linewidth=0.8, alpha=0.6)
            ax.xaxis.set_minor_locator(NullLocator())  # minor log ticks cost seconds in bbox_inches="tight"
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_title("log scale (1% FPR marked)")
        else:
            ax.set_title(title)
        ax.set_xlabel("false-positive rate (held-out called member)")
        ax.set_ylabel("true-positive rate")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.subplots_adjust(wspace=0.3)
    fig.legend(handles, labels, loc="upper center", ncol=2 if len(labels) <= 9 else 3, frameon=False, fontsize=8, bbox_to_anchor=(0.5, 0.0))
    return _png(fig)


def nearest_figure(rep: Replication, heldout_l2: np.ndarray | None, heldout_ratio: np.ndarray | None) -> str:
    """Histograms of the nearest-training L2 distance and of the nearest/second ratio, generated vs held-out real."""
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.5, 3.0))
    bins = np.linspace(0, max(rep.nearest_l2.max(), 0 if heldout_l2 is None else heldout_l2.max()) * 1.05 + 1e-9, 40)
    left.hist(rep.nearest_l2, bins=bins, alpha=0.7, density=True, color=PALETTE[0], label="generated")
    if heldout_l2 is not None:
        left.hist(heldout_l2, bins=bins, alpha=0.5, density=True, color=PALETTE[1], label="held-out real")
    left.set_xlabel("L2 distance to nearest training image")
    left.set_ylabel("density")
    left.legend(frameon=False)
    rbins = np.linspace(0, 1, 41)
    right.hist(rep.ratio, bins=rbins, alpha=0.7, density=True, color=PALETTE[0], label="generated")
    if heldout_ratio is not None:
        right.hist(heldout_ratio, bins=rbins, alpha=0.5, density=True, color=PALETTE[1], label="held-out real")
    right.axvline(rep.ratio_threshold, color="#cc4444", linestyle="--", label=f"replica threshold {rep.ratio_threshold:.2f}")
    right.set_xlabel("nearest / second-nearest distance")
    right.set_ylabel("density")
    right.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never on them
    fig.tight_layout()
    return _png(fig)


def pairs_figure(generated: torch.Tensor, train: torch.Tensor, rep: Replication) -> str:
    """The closest generated/training pairs side by side (top row generated, bottom row its nearest training image)."""
    plt = _plt()
    rows = rep.closest
    k = len(rows)
    fig, axes = plt.subplots(2, k, figsize=(1.15 * k, 2.8), squeeze=False)
    for j, g in enumerate(rows):
        pair = [generated[g], train[rep.nearest_index[g]]]
        for i, img in enumerate(pair):
            ax = axes[i, j]
            x = ((img.float().clamp(-1, 1) + 1) / 2).numpy()
            ax.imshow(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("#cc4444" if rep.replicated[g] else "#999999")
        axes[0, j].set_title(f"ratio {rep.ratio[g]:.2f}", fontsize=8, color="#cc4444" if rep.replicated[g] else "black")
        axes[1, j].set_xlabel(f"d={rep.nearest_l2[g]:.2f}", fontsize=8)
    axes[0, 0].set_ylabel("generated")
    axes[1, 0].set_ylabel("nearest train")
    fig.tight_layout()
    return _png(fig)
