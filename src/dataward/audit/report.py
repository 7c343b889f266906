"""The audit report: JSON with stable keys (docs/audit.md) and one self-contained HTML page.

Figures are drawn with matplotlib (Agg backend) and embedded as base64 PNG, so the page needs no other file and no
network. :func:`write_html` takes the report dict from :func:`dataward.audit.audit_ward` and the arrays it kept
(``artifacts``: generated images, attribution, per-compartment samples, nearest-neighbour results).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Top-level keys of the JSON report, in order. Every section in SECTION_KEYS carries "status" ("ok" | "skipped" | "error")
# and, when not ok, "reason". Changing this list is a schema change: bump dataward.audit.SCHEMA.
REPORT_KEYS = ("schema", "ward", "settings", "sampling", "quality", "replication", "membership", "forgetting", "privacy", "timings")
SECTION_KEYS = {
    "quality": ("feature_net", "fd", "fd_train_vs_heldout", "n_generated", "n_reference", "fd_per_compartment", "cas", "cas_real"),
    "replication": (
        "replication_rate", "ratio_threshold", "replicated", "nearest_l2_median", "ratio_min", "ratio_median",
        "cosine_threshold", "cosine_share", "cosine_median", "cosine_max", "closest_pairs",
    ),
    "membership": ("attacks", "skipped", "worst_auc"),
    "forgetting": ("forgotten", "attacks", "auc", "null_sd", "z", "consistent_with_unseen", "certificate"),
    "privacy": ("epsilon", "delta", "models"),
}
ATTACK_KEYS = ("attack", "auc", "tpr_at_1pct_fpr", "best_t", "auc_by_t", "n_members", "n_nonmembers", "roc")

PALETTE = ["#3b6fb6", "#e07b39", "#4c9a5b", "#c04a4a", "#8a6bb8", "#8c6d4f", "#d27db5", "#7f7f7f", "#b5b83a", "#3bb5c4"]


def write_json(path: str | Path, report: dict) -> None:
    """Write the report as indented JSON."""
    Path(path).write_text(json.dumps(report, indent=2, default=_json_default))


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------------- figures


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
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _tile(images: torch.Tensor, ncol: int, pad: int = 1) -> np.ndarray:
    """Images (N, C, H, W) in [-1, 1] tiled into one (H', W') or (H', W', 3) array in [0, 1]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) / 2).numpy()
    n, c, h, w = x.shape
    nrow = -(-n // ncol)
    canvas = np.ones((c, nrow * (h + pad) + pad, ncol * (w + pad) + pad), dtype=np.float32)
    for i in range(n):
        r, k = divmod(i, ncol)
        canvas[:, pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = x[i]
    return canvas[0] if c == 1 else canvas.transpose(1, 2, 0)


def grid_figure(images: torch.Tensor, title: str, ncol: int = 10, labels: torch.Tensor | None = None, size: float = 3.2) -> str:
    """A grid of images (N, C, H, W) in [-1, 1] (sorted by label when labels are given)."""
    plt = _plt()
    if labels is not None:
        order = torch.argsort(labels, stable=True)
        images = images[order]
    tiled = _tile(images, ncol)
    fig, ax = plt.subplots(figsize=(size, size * tiled.shape[0] / tiled.shape[1] + 0.3))
    ax.imshow(tiled, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    return _png(fig)


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


# line style per (denoiser, attack) in the ROC figures; the colour is the compartment's
ROC_STYLES = {("raw", "loss"): "-", ("raw", "pia"): ":", ("guarded", "loss"): "--", ("guarded", "pia"): "-."}


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
            ax.plot(fpr, tpr, style, color=PALETTE[compartment % len(PALETTE)], linewidth=1.6,
                    label=f"{label}  AUC {summary['auc']:.3f}, t={summary['best_t']}")
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


def nearest_figure(rep, heldout_l2: np.ndarray | None, heldout_ratio: np.ndarray | None) -> str:
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
    right.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return _png(fig)


def pairs_figure(generated: torch.Tensor, train: torch.Tensor, rep, train_ids: list[str] | None = None) -> str:
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


# --------------------------------------------------------------------------------------------------------------- page

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; color: #1d232b; background: #f5f6f8; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; } h2 { font-size: 19px; margin: 0 0 10px; border-bottom: 1px solid #e1e4e8; padding-bottom: 6px; }
h3 { font-size: 14px; margin: 16px 0 6px; color: #444; }
.sub { color: #5c6670; font-size: 13px; margin-bottom: 18px; }
section { background: white; border: 1px solid #e1e4e8; border-radius: 8px; padding: 16px 20px; margin: 16px 0; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(160px, 1fr)); gap: 12px; margin: 16px 0; }
.card { background: white; border: 1px solid #e1e4e8; border-radius: 8px; padding: 12px 14px; }
.card .v { font-size: 24px; font-weight: 600; } .card .k { font-size: 12px; color: #5c6670; } .card .n { font-size: 11px; color: #8a949e; }
.good { color: #2e7d32; } .warn { color: #b26a00; } .bad { color: #c62828; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0 10px; } th, td { border-bottom: 1px solid #eceef1; padding: 4px 10px; text-align: left; }
th { background: #fafbfc; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.skip { color: #6a737d; font-style: italic; } .figs { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
img { max-width: 100%; } p.note { font-size: 12px; color: #5c6670; margin: 4px 0; }
"""


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.1e}" if 0 < abs(value) < 10 ** -digits else f"{value:.{digits}f}"
    return html.escape(str(value))


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_fmt(v)}</td>' if i in numeric else f"<td>{_fmt(v)}</td>" for i, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _skipped(section: dict) -> str:
    return f'<p class="skip">{html.escape(section.get("status", "skipped"))}: {html.escape(section.get("reason", ""))}</p>'


def _card(label: str, value, note: str = "", tone: str = "") -> str:
    return f'<div class="card"><div class="k">{html.escape(label)}</div><div class="v {tone}">{_fmt(value)}</div><div class="n">{html.escape(note)}</div></div>'


def _auc_tone(auc) -> str:
    if auc is None:
        return ""
    return "good" if auc < 0.6 else "warn" if auc < 0.75 else "bad"


def _privacy_caption(priv: dict) -> str:
    """The DP compartments' (ε, δ) under the ward's ε (which is infinite while one compartment is not DP)."""
    dp = [m for m in priv["models"] if m["dp"]]
    text = "; ".join(f"compartment {m['compartment']}: ε = {_fmt(m['epsilon'], 2)} at δ = {_fmt(m['delta'], 6)}" for m in dp)
    others = len(priv["models"]) - len(dp)
    return text + (f"; {others} compartment(s) not DP" if others else "")


def render_html(report: dict, artifacts: dict[str, Any]) -> str:
    """The whole report as one HTML string (figures inlined)."""
    ward, q, rep, mia, forget, priv = (report.get(k, {}) for k in ("ward", "quality", "replication", "membership", "forgetting", "privacy"))
    ok = lambda s: s.get("status") == "ok"  # noqa: E731
    cards = [
        _card("Fréchet distance", q.get("fd") if ok(q) else None, f"train vs held-out: {_fmt(q.get('fd_train_vs_heldout'))}" if ok(q) else q.get("reason", "")),
        _card("Downstream accuracy (CAS)", q.get("cas") if ok(q) else None, f"trained on real: {_fmt(q.get('cas_real'))}" if ok(q) else ""),
        _card("Replicated samples", f"{100 * rep['replication_rate']:.1f}%" if ok(rep) else None,
              f"held-out baseline {100 * rep['heldout_baseline']['replication_rate']:.1f}%" if ok(rep) and "heldout_baseline" in rep else "",
              "good" if ok(rep) and rep["replication_rate"] == 0 else "warn" if ok(rep) else ""),
        _card("Worst MIA AUC (loss, raw)", (mia.get("worst_auc") or {}).get("raw_loss") if ok(mia) else None, "0.5 = chance",
              _auc_tone((mia.get("worst_auc") or {}).get("raw_loss") if ok(mia) else None)),
        _card("Forgotten: MIA AUC", forget.get("auc") if ok(forget) else None,
              f"{forget['forgotten']} forgotten; never-seen range 0.5 ± {1.96 * forget['null_sd']:.2f}" if ok(forget) else "nothing forgotten",
              ("good" if forget["consistent_with_unseen"] else "bad") if ok(forget) else ""),
        _card("Privacy ε (ward)", priv.get("epsilon") if ok(priv) else None, _privacy_caption(priv) if ok(priv) else "no DP model"),
    ]
    parts = [
        f"<h1>dataward audit</h1><div class='sub'>ward <b>{html.escape(str(ward.get('path', '')))}</b> · data {html.escape(str(ward.get('data', '')))} · "
        f"{len(ward.get('compartments', []))} compartment(s) · {ward.get('training_samples')} training samples · "
        f"{ward.get('forgotten_samples', 0)} forgotten · {report.get('settings', {}).get('n')} generated · "
        f"{_fmt(report.get('timings', {}).get('total'), 1)} s · schema {html.escape(report.get('schema', ''))}</div>",
        f"<div class='cards'>{''.join(cards)}</div>",
    ]

    # samples
    s = report.get("sampling", {})
    generated = artifacts.get("generated")
    figs = []
    if generated is not None:
        figs.append(grid_figure(generated[:100], f"composed ({s.get('weights')}, {s.get('sampler')})", labels=None if artifacts.get("labels") is None else artifacts["labels"][:100], size=4.2))
    for c, images in (artifacts.get("per_compartment") or {}).items():
        figs.append(grid_figure(images[:64], f"compartment {c} only", ncol=8, size=2.6))
    body = f"<div class='figs'>{''.join(figs)}</div>"
    if artifacts.get("attribution") is not None and artifacts["attribution"].shape[1] > 1:
        body += "<h3>Attribution to compartments</h3>" + attribution_figure(artifacts["attribution"], artifacts.get("compartments", []))
        body += "<p class='note'>Each sample's trajectory-averaged weight w_i per compartment: how much of it each compartment made.</p>"
    parts.append(f"<section><h2>Samples</h2>{body}<p class='note'>{s.get('n')} samples in {_fmt(s.get('seconds'), 1)} s.</p></section>")

    # quality
    if ok(q):
        fn = q.get("feature_net", {})
        rows = [["composed", q["fd"]]] + [[f"compartment {c}", v] for c, v in q.get("fd_per_compartment", {}).items()] + [["training data (reference floor)", q["fd_train_vs_heldout"]]]
        body = _table(["images", "FD to held-out"], rows, {1})
        body += _table(["classifier trained on", "accuracy on held-out"], [["generated samples (CAS)", q.get("cas")], ["real training data", q.get("cas_real")]], {1})
        body += (f"<p class='note'>Features: {html.escape(str(fn.get('name')))} (held-out accuracy {_fmt(fn.get('heldout_accuracy'))}). "
                 f"FD uses {q['n_generated']} generated vs {q['n_reference']} held-out images; small sets bias FD upward, so compare with the training-data floor.</p>")
    else:
        body = _skipped(q)
    parts.append(f"<section><h2>Quality</h2>{body}</section>")

    # replication
    if ok(rep) and artifacts.get("replication") is not None:
        r = artifacts["replication"]
        rows = [["generated", rep["replication_rate"], rep["nearest_l2_median"], rep["cosine_share"], rep["cosine_median"]]]
        if "heldout_baseline" in rep:
            b = rep["heldout_baseline"]
            rows.append(["held-out real (baseline)", b["replication_rate"], b["nearest_l2_median"], b["cosine_share"], None])
        body = _table(["images", "replicated (ratio < 1/3)", "median nearest L2", f"share cosine > {rep['cosine_threshold']}", "median cosine"], rows, {1, 2, 3, 4})
        body += nearest_figure(r, artifacts.get("heldout_nearest_l2"), artifacts.get("heldout_ratio"))
        if len(r.closest):
            body += "<h3>Closest pairs (smallest nearest/second ratio)</h3>" + pairs_figure(artifacts["generated"], artifacts["train_images"], r)
    else:
        body = _skipped(rep)
    parts.append(f"<section><h2>Replication</h2>{body}</section>")

    # membership
    if ok(mia):
        rows, curves = [], []
        for a in mia["attacks"]:
            for kind in ("loss", "pia"):
                rows.append([f"compartment {a['compartment']}", a["denoiser"], kind, a[kind]["auc"], a[kind]["tpr_at_1pct_fpr"], a[kind]["best_t"], f"{a[kind]['n_members']} / {a[kind]['n_nonmembers']}"])
                curves.append((f"c{a['compartment']} {a['denoiser']} {kind}", a[kind], a["compartment"], ROC_STYLES[a["denoiser"], kind]))
        body = _table(["model", "denoiser", "attack", "AUC", "TPR @ 1% FPR", "best t", "members / held-out"], rows, {3, 4, 5})
        body += roc_figure(curves, "members vs held-out")
        body += "<p class='note'>Loss attack (Matsumoto et al. 2023) and PIA (Kong et al. 2024), best timestep of the sweep: the attacker's best case. 0.5 is chance.</p>"
        for s_ in mia.get("skipped", []):
            body += f"<p class='skip'>compartment {s_['compartment']} {html.escape(s_['denoiser'])}: {html.escape(s_['reason'])}</p>"
    else:
        body = _skipped(mia)
    parts.append(f"<section><h2>Membership inference</h2>{body}</section>")

    # forgetting
    if ok(forget):
        rows = [[f"compartment {a['compartment']}", a["forgotten"], a.get("timestep"), a.get("loss", {}).get("auc"), a.get("loss", {}).get("tpr_at_1pct_fpr"),
                 a.get("reason", "")] for a in forget["attacks"]]
        body = _table(["model", "forgotten samples", "t", "loss-attack AUC", "TPR @ 1% FPR", "note"], rows, {1, 2, 3, 4})
        verdict = "consistent with samples the models never saw" if forget["consistent_with_unseen"] else "NOT consistent with never-seen samples"
        body += (f"<p class='{'good' if forget['consistent_with_unseen'] else 'bad'}'>Pooled AUC {_fmt(forget['auc'])} over {forget['forgotten']} forgotten samples "
                 f"(each ranked among the held-out losses under its compartment's model, at a timestep chosen without them): {verdict} "
                 f"(0.5 ± {1.96 * forget['null_sd']:.3f} at the 5% level; z = {forget['z']:.2f}).</p>")
        curves = [(f"c{a['compartment']} forgotten loss", a["loss"], a["compartment"], "-") for a in forget["attacks"] if "loss" in a]
        if curves:
            body += roc_figure(curves, "forgotten vs held-out")
        cert = forget.get("certificate")
        if cert is None:
            body += f"<p class='note'>Bitwise certificate: {html.escape(forget.get('certificate_reason', 'not run'))}</p>"
        else:
            body += f"<p class='{'good' if cert['ok'] else 'bad'}'>Bitwise certificate: {'every served model equals its from-scratch retrain' if cert['ok'] else 'MISMATCH'}</p>"
            body += _table(["kind", "compartment", "equal", "served sha256"], [[m.get("kind"), m.get("compartment"), m.get("equal"), str(m.get("served_sha256", ""))[:16]] for m in cert["models"]])
    else:
        body = _skipped(forget)
    parts.append(f"<section><h2>Forgetting</h2>{body}</section>")

    # privacy
    if ok(priv):
        rows = [[m.get("compartment"), m.get("epsilon"), m.get("delta"), m.get("accountant"), m.get("epsilon_check"), m.get("check_accountant"), m.get("noise_multiplier"), m.get("sample_rate"), m.get("steps")] for m in priv["models"]]
        body = _table(["compartment", "ε", "δ", "accountant", "ε (check)", "check accountant", "σ", "sample rate", "steps"], rows, {1, 2, 4, 6, 7, 8})
        body += f"<p class='note'>Ward ε = {_fmt(priv.get('epsilon'))} at δ = {_fmt(priv.get('delta'), 6)} (max over disjoint compartments: parallel composition).</p>"
        body += "".join(f"<p class='note'>{html.escape(note)}</p>" for note in priv.get("notes", []))
    else:
        body = _skipped(priv)
    parts.append(f"<section><h2>Privacy budget</h2>{body}</section>")

    timings = report.get("timings", {})
    parts.append("<section><h2>Timings</h2>" + _table(["step", "seconds"], [[k, float(v)] for k, v in timings.items()], {1}) + "</section>")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>dataward audit</title><style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>"


def write_html(path: str | Path, report: dict, artifacts: dict[str, Any]) -> None:
    """Write the self-contained HTML report."""
    Path(path).write_text(render_html(report, artifacts), encoding="utf-8")


def summary_rows(report: dict) -> list[tuple[str, str]]:
    """(section, one-line result) per section, for the CLI's table."""
    def f(v, d=3):
        return _fmt(v, d)

    rows = []
    q = report.get("quality", {})
    rows.append(("quality", f"FD {f(q.get('fd'), 2)} (training data: {f(q.get('fd_train_vs_heldout'), 2)}), CAS {f(q.get('cas'))} (real: {f(q.get('cas_real'))}), "
                 f"feature net accuracy {f((q.get('feature_net') or {}).get('heldout_accuracy'))}" if q.get("status") == "ok" else f"{q.get('status')}: {q.get('reason')}"))
    r = report.get("replication", {})
    rows.append(("replication", f"{f(100 * r['replication_rate'], 1)}% replicated (ratio < 1/3), {f(None if r.get('cosine_share') is None else 100 * r['cosine_share'], 1)}% "
                 f"cosine > {r.get('cosine_threshold')}, median nearest L2 {f(r.get('nearest_l2_median'), 2)}" if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason')}"))
    m = report.get("membership", {})
    if m.get("status") == "ok":
        text = "; ".join(f"c{a['compartment']} {a['denoiser']}: loss AUC {f(a['loss']['auc'])} (TPR@1%FPR {f(a['loss']['tpr_at_1pct_fpr'])}), "
                         f"PIA AUC {f(a['pia']['auc'])}" for a in m["attacks"])
        rows.append(("membership", text))
    else:
        rows.append(("membership", f"{m.get('status')}: {m.get('reason')}"))
    g = report.get("forgetting", {})
    if g.get("status") == "ok":
        cert = g.get("certificate")
        rows.append(("forgetting", f"{g['forgotten']} forgotten: loss AUC vs held-out {f(g['auc'])} (never seen: 0.5 ± {1.96 * g['null_sd']:.2f}); certificate "
                     + ("not run (--verify)" if cert is None else "OK" if cert["ok"] else "FAILED")))
    else:
        rows.append(("forgetting", f"{g.get('status')}: {g.get('reason')}"))
    p = report.get("privacy", {})
    rows.append(("privacy", f"ε = {f(p.get('epsilon'), 2)} at δ = {f(p.get('delta'), 6)}; check: "
                 + ", ".join(f"c{x['compartment']} ε {f(x['epsilon'], 2)}, {f(x['epsilon_check'], 2)} by {x['check_accountant']}" for x in p.get("models", []) if x["dp"])
                 if p.get("status") == "ok" else f"{p.get('status')}: {p.get('reason')}"))
    return rows
