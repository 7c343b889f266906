"""The audit report: JSON with stable keys (docs/audit.md) and one self-contained HTML page.

:func:`write_html` takes the report dict from :func:`dataward.audit.audit_ward` and the arrays it kept (``artifacts``:
generated images, attribution, per-compartment samples, nearest-neighbour results); the page has one renderer per
section, its figures come from :mod:`dataward.audit.figures` (inlined as base64 PNG, so it needs no other file and no
network). :func:`summary_rows` is the one-line-per-section summary the CLI and the demo print.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from dataward.audit.figures import ROC_STYLES, attribution_figure, class_grid_figure, nearest_figure, pairs_figure, roc_figure, rows_figure

# Top-level keys of the JSON report, in order. Every section in SECTION_KEYS carries "status" ("ok" | "skipped" | "error")
# and, when not ok, "reason". Changing this list is a schema change: bump dataward.audit.SCHEMA.
REPORT_KEYS = ("schema", "ward", "settings", "sampling", "quality", "replication", "membership", "forgetting", "privacy", "protection",
               "timings")
SECTION_KEYS = {
    "quality": ("feature_net", "fd", "fd_train_vs_heldout", "n_generated", "n_reference", "fd_per_compartment", "cas", "cas_real"),
    "replication": (
        "replication_rate", "ratio_threshold", "replicated", "nearest_l2_median", "ratio_min", "ratio_median",
        "cosine_threshold", "cosine_share", "cosine_median", "cosine_max", "closest_pairs",
    ),
    "membership": ("attacks", "skipped", "worst_auc"),
    "forgetting": ("forgotten", "attacks", "auc", "null_sd", "z", "consistent_with_unseen", "certificate"),
    "privacy": ("epsilon", "delta", "models"),
    "protection": ("compartments", "probe", "memorises_at"),
}
ATTACK_KEYS = ("attack", "auc", "tpr_at_1pct_fpr", "best_t", "auc_by_t", "n_members", "n_nonmembers", "roc")


def write_json(path: str | Path, report: dict) -> None:
    """Write the report as indented JSON."""
    Path(path).write_text(json.dumps(report, indent=2, default=json_default))


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for the numpy scalars and arrays a report may hold."""
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


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



def _ok(section: dict) -> bool:
    return section.get("status") == "ok"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{title}</h2>{body}</section>"


def report_title(report: dict) -> str:
    """What was done, in one line: which ward, the sections that were measured, on how many generated images."""
    name = Path(str(report.get("ward", {}).get("path", ""))).name or "a ward"
    done = [section for section in SECTION_KEYS if _ok(report.get(section) or {})]
    measured = f"{', '.join(done)} measured" if done else "nothing measured"
    return f"dataward audit of ward {name}: {measured} on {report.get('settings', {}).get('n')} generated images"


def _header(report: dict) -> str:
    """The title line (what was done), then ward, data, sizes, time and schema."""
    ward = report.get("ward", {})
    return (f"<h1>{html.escape(report_title(report))}</h1><div class='sub'>ward <b>{html.escape(str(ward.get('path', '')))}</b> · data {html.escape(str(ward.get('data', '')))} · "
            f"{len(ward.get('compartments', []))} compartment(s) · {ward.get('training_samples')} training samples · "
            f"{ward.get('forgotten_samples', 0)} forgotten · {_exports(ward.get('exports') or [])}{report.get('settings', {}).get('n')} generated · "
            f"{_fmt(report.get('timings', {}).get('total'), 1)} s · schema {html.escape(report.get('schema', ''))}</div>")


def _exports(exports: list[dict]) -> str:
    """Exports made (copies outside the ward) and how many a later forget or add made stale."""
    if not exports:
        return ""
    stale = [e for e in exports if e["stale"]]
    warning = f" (<b class='bad'>{len(stale)} stale</b>: {html.escape(', '.join(e['folder'] for e in stale))})" if stale else ""
    return f"{len(exports)} export(s){warning} · "


def _worst_attack(worst: dict) -> tuple[str | None, float | None]:
    """The highest AUC over the attacks (loss, PIA) and denoisers (raw, guarded), and which it was."""
    names = {"raw_loss": "loss attack, raw", "raw_pia": "PIA, raw", "guarded_loss": "loss attack, guarded", "guarded_pia": "PIA, guarded"}
    found = [(auc, names[key]) for key, auc in worst.items() if auc is not None and key in names]
    if not found:
        return None, None
    auc, name = max(found)
    return name, auc


def _cards(report: dict) -> str:
    """One card per headline number."""
    q, rep, mia, forget, priv = (report.get(k, {}) for k in ("quality", "replication", "membership", "forgetting", "privacy"))
    worst_attack, worst_auc = _worst_attack(mia.get("worst_auc") or {}) if _ok(mia) else (None, None)
    cards = [
        _card("Fréchet distance", q.get("fd") if _ok(q) else None, f"train vs held-out: {_fmt(q.get('fd_train_vs_heldout'))}" if _ok(q) else q.get("reason", "")),
        _card("Downstream accuracy (CAS)", q.get("cas") if _ok(q) else None, f"trained on real: {_fmt(q.get('cas_real'))}" if _ok(q) else ""),
        _card("Replicated samples", f"{100 * rep['replication_rate']:.1f}%" if _ok(rep) else None,
              f"held-out baseline {100 * rep['heldout_baseline']['replication_rate']:.1f}%" if _ok(rep) and "heldout_baseline" in rep else "",
              "good" if _ok(rep) and rep["replication_rate"] == 0 else "warn" if _ok(rep) else ""),
        _card("Worst MIA AUC", worst_auc, f"{worst_attack}; 0.5 = chance" if worst_attack else "0.5 = chance", _auc_tone(worst_auc)),
        _card("Forgotten: MIA AUC", forget.get("auc") if _ok(forget) else None,
              f"{forget['forgotten']} forgotten; never-seen range 0.5 ± {1.96 * forget['null_sd']:.2f}" if _ok(forget) else "nothing forgotten",
              ("good" if forget["consistent_with_unseen"] else "bad") if _ok(forget) else ""),
        _card("Privacy ε (ward)", priv.get("epsilon") if _ok(priv) else None, _privacy_caption(priv) if _ok(priv) else "no DP model"),
    ]
    return f"<div class='cards'>{''.join(cards)}</div>"


def _samples_html(s: dict, artifacts: dict[str, Any]) -> str:
    """Sample grids (composed and per compartment) and the attribution figure."""
    generated = artifacts.get("generated")
    figs = []
    if generated is not None:
        labels = None if artifacts.get("labels") is None else artifacts["labels"][:100]
        attribution = None if artifacts.get("attribution") is None else artifacts["attribution"][:100]
        figs.append(class_grid_figure(generated[:100], labels, f"composed ({s.get('weights')} weights, {s.get('sampler')} sampler): one row "
                                      "per class asked for; under each image, the share each compartment made of it", attribution))
    labels_of = artifacts.get("per_compartment_labels") or {}
    for c, images in (artifacts.get("per_compartment") or {}).items():
        labels = labels_of.get(c)
        figs.append(class_grid_figure(images[:64], None if labels is None else labels[:64],
                                      f"compartment {c} only, seed as the others: one row per class asked for"))
    body = f"<div class='figs'>{''.join(figs)}</div>"
    if artifacts.get("attribution") is not None and artifacts["attribution"].shape[1] > 1:
        body += "<h3>Attribution to compartments</h3>" + attribution_figure(artifacts["attribution"], artifacts.get("compartments", []))
        body += "<p class='note'>Each sample's trajectory-averaged weight w_i per compartment: how much of it each compartment made.</p>"
    return _section("Samples", f"{body}<p class='note'>{s.get('n')} samples in {_fmt(s.get('seconds'), 1)} s.</p>")


def _quality_html(q: dict) -> str:
    """FD table (composed, per compartment, training floor) and CAS table."""
    if not _ok(q):
        return _skipped(q)
    fn = q.get("feature_net", {})
    rows = [["composed", q["fd"]]] + [[f"compartment {c}", v] for c, v in q.get("fd_per_compartment", {}).items()] + [["training data (reference floor)", q["fd_train_vs_heldout"]]]
    body = _table(["images", "FD to held-out"], rows, {1})
    body += _table(["classifier trained on", "accuracy on held-out"], [["generated samples (CAS)", q.get("cas")], ["real training data", q.get("cas_real")]], {1})
    return body + (f"<p class='note'>Features: {html.escape(str(fn.get('name')))} (held-out accuracy {_fmt(fn.get('heldout_accuracy'))}). "
                   f"FD uses {q['n_generated']} generated vs {q['n_reference']} held-out images; small sets bias FD upward, so compare with the training-data floor.</p>")


def _replication_html(rep: dict, artifacts: dict[str, Any]) -> str:
    """Replication table, nearest-distance histograms and the closest pairs."""
    if not _ok(rep) or artifacts.get("replication") is None:
        return _skipped(rep)
    r = artifacts["replication"]
    rows = [["generated", rep["replication_rate"], rep["nearest_l2_median"], rep["cosine_share"], rep["cosine_median"]]]
    if "heldout_baseline" in rep:
        b = rep["heldout_baseline"]
        rows.append(["held-out real (baseline)", b["replication_rate"], b["nearest_l2_median"], b["cosine_share"], None])
    body = _table(["images", "replicated (ratio < 1/3)", "median nearest L2", f"share cosine > {rep['cosine_threshold']}", "median cosine"], rows, {1, 2, 3, 4})
    body += nearest_figure(r, artifacts.get("heldout_nearest_l2"), artifacts.get("heldout_ratio"))
    if len(r.closest):
        body += "<h3>Closest pairs (smallest nearest/second ratio)</h3>" + pairs_figure(artifacts["generated"], artifacts["train_images"], r)
    return body


def _membership_html(mia: dict) -> str:
    """Attack table and ROC curves, members vs held-out."""
    if not _ok(mia):
        return _skipped(mia)
    rows, curves = [], []
    raw = {a["compartment"]: a for a in mia["attacks"] if a["denoiser"] == "raw"}
    same = sorted(a["compartment"] for a in mia["attacks"] if a["denoiser"] == "guarded" and a["compartment"] in raw
                  and all(a[k] == raw[a["compartment"]][k] for k in ("loss", "pia")))
    for a in mia["attacks"]:
        if a["denoiser"] == "guarded" and a["compartment"] in same:
            continue  # said once below instead of a second identical row and curve
        for kind in ("loss", "pia"):
            model = f"compartment {a['compartment']}" + (" (not valid: see below)" if "invalid" in a else "")
            rows.append([model, a["denoiser"], kind, a[kind]["auc"], a[kind]["tpr_at_1pct_fpr"], a[kind]["best_t"], f"{a[kind]['n_members']} / {a[kind]['n_nonmembers']}"])
            if "invalid" not in a:
                curves.append((f"c{a['compartment']} {a['denoiser']} {kind}", a[kind], a["compartment"], ROC_STYLES[a["denoiser"], kind]))
    body = _table(["model", "denoiser", "attack", "AUC", "TPR @ 1% FPR", "best t", "members / held-out"], rows, {3, 4, 5})
    body += roc_figure(curves, "members vs held-out")
    body += "<p class='note'>Loss attack (Matsumoto et al. 2023) and PIA (Kong et al. 2024), best timestep of the sweep: the attacker's best case. 0.5 is chance.</p>"
    for s in mia.get("skipped", []):
        body += f"<p class='skip'>compartment {s['compartment']} {html.escape(s['denoiser'])}: {html.escape(s['reason'])}</p>"
    if same:
        body += (f"<p class='note'>Guarded = raw for compartment(s) {', '.join(map(str, same))}: the same AUCs to the last digit "
                 "(the guard never steered on these inputs), so their guarded rows and curves are not drawn twice.</p>")
    for invalid in {(a["compartment"], a["invalid"]) for a in mia["attacks"] if "invalid" in a}:
        body += f"<p class='skip'>compartment {invalid[0]}: not counted in the worst AUC: {html.escape(invalid[1])}</p>"
    return body


def _forgetting_html(forget: dict) -> str:
    """Per-compartment forgetting attacks, the pooled verdict, ROC curves and the certificate."""
    if not _ok(forget):
        return _skipped(forget)
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
        return body + f"<p class='note'>Bitwise certificate: {html.escape(forget.get('certificate_reason', 'not run'))}</p>"
    body += f"<p class='{'good' if cert['ok'] else 'bad'}'>Bitwise certificate: {'every served model equals its from-scratch retrain' if cert['ok'] else 'MISMATCH'}</p>"
    if "source" in cert:  # an earlier run of the certificate, still about the models served now
        return body + f"<p class='note'>From {html.escape(cert['source'])} (models {', '.join(f'#{m}' for m in cert['models'])}).</p>"
    return body + _table(["kind", "compartment", "equal", "served sha256"], [[m.get("kind"), m.get("compartment"), m.get("equal"), str(m.get("served_sha256", ""))[:16]] for m in cert["models"]])


# why the report shows two ε per DP compartment, and which one holds
ACCOUNTANTS_NOTE = ("ε is the guarantee: the bound computed by the accountant the compartment was trained with (PRV by default, "
                    "numerically tight, reported at the upper end of its error bar). ε (check) recomputes ε from the same recorded "
                    "(σ, sample rate, steps) with the other accountant, as a check that the record is consistent. Both are upper "
                    "bounds that hold, and the smaller one is what is claimed: RDP's is looser (converting Rényi DP to (ε, δ) "
                    "loses slack), so with PRV training the check is expected to be higher (the demo's ε = 10: 11.5 by RDP); "
                    "a check below the guarantee, or far above it, would point to a wrong record.")


def _privacy_html(priv: dict) -> str:
    """(ε, δ) per compartment with the second accountant's check, and the notes."""
    if not _ok(priv):
        return _skipped(priv)
    rows = [[m.get("compartment"), m.get("epsilon"), m.get("delta"), m.get("accountant"), m.get("epsilon_check"), m.get("check_accountant"), m.get("noise_multiplier"), m.get("sample_rate"), m.get("steps")] for m in priv["models"]]
    body = _table(["compartment", "ε (the guarantee)", "δ", "accountant", "ε (check)", "check accountant", "σ", "sample rate", "steps"], rows, {1, 2, 4, 6, 7, 8})
    body += f"<p class='note'>Ward ε = {_fmt(priv.get('epsilon'))} at δ = {_fmt(priv.get('delta'), 6)} (max over disjoint compartments: parallel composition).</p>"
    body += f"<p class='note'>{html.escape(ACCOUNTANTS_NOTE)}</p>"
    return body + "".join(f"<p class='note'>{html.escape(note)}</p>" for note in priv.get("notes", []))


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def _guard_pictures_html(pictures: dict) -> str:
    """Per guarded compartment: the same seeds unguarded and guarded, their difference and the nearest training images."""
    if not pictures:
        return ""
    return "<h3>What a guard changed</h3>" + "".join(rows_figure(rows, f"compartment {c}. {caption}") for c, (rows, caption) in pictures.items())


def _protection_html(protection: dict) -> str:
    """One row per compartment: how often its samples copy a training image, unguarded and guarded, how often its guard
    steered, and what protects it, in words."""
    if not _ok(protection):
        return _skipped(protection)
    rows = [[row["compartment"], _percent(row["unguarded_replication"]), _percent(row["guarded_replication"]),
             _percent(row["guard_steered_share"]), row["protection"]] for row in protection["compartments"]]
    note = (f"<p class='note'>Each compartment sampled alone, {protection['probe']} images unguarded (and guarded, with guards), seed and "
            f"steps as above. Copies: nearest / second-nearest training L2 &lt; 1/3 against the compartment's own images. At "
            f"{100 * protection['memorises_at']:.0f}% or more the compartment memorises. Guard steering: the share of its checks that steered; "
            "a guard that never steers protects nothing.</p>")
    return _table(["compartment", "copies unguarded", "copies guarded", "guard steered", "protection"], rows, set()) + note


def render_html(report: dict, artifacts: dict[str, Any]) -> str:
    """The whole report as one HTML string (figures inlined)."""
    timings = report.get("timings", {})
    parts = [
        _header(report),
        _cards(report),
        _samples_html(report.get("sampling", {}), artifacts),
        _section("Quality", _quality_html(report.get("quality", {}))),
        _section("Replication", _replication_html(report.get("replication", {}), artifacts)),
        _section("Membership inference", _membership_html(report.get("membership", {}))),
        _section("Forgetting", _forgetting_html(report.get("forgetting", {}))),
        _section("Privacy budget", _privacy_html(report.get("privacy", {}))),
        _section("What protects each compartment", _protection_html(report.get("protection", {}))
                 + _guard_pictures_html(artifacts.get("guard_pictures") or {})),
        _section("Timings", _table(["step", "seconds"], [[k, float(v)] for k, v in timings.items()], {1})),
    ]
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report_title(report))}</title><style>{CSS}</style></head><body><main>{''.join(parts)}</main></body></html>"


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
                         f"PIA AUC {f(a['pia']['auc'])}" + (" (not valid: different sources)" if "invalid" in a else "") for a in m["attacks"])
        rows.append(("membership", text))
    else:
        rows.append(("membership", f"{m.get('status')}: {m.get('reason')}"))
    g = report.get("forgetting", {})
    if g.get("status") == "ok":
        cert = g.get("certificate")
        rows.append(("forgetting", f"{g['forgotten']} forgotten: loss AUC vs held-out {f(g['auc'])} (never seen: 0.5 ± {1.96 * g['null_sd']:.2f}); certificate "
                     + (g.get("certificate_reason", "not run") if cert is None else "OK" if cert["ok"] else "FAILED")))
    else:
        rows.append(("forgetting", f"{g.get('status')}: {g.get('reason')}"))
    p = report.get("privacy", {})
    rows.append(("privacy", f"ε = {f(p.get('epsilon'), 2)} at δ = {f(p.get('delta'), 6)} (the guarantee); check by the other accountant "
                 "(RDP is a looser upper bound, so higher): "
                 + ", ".join(f"c{x['compartment']} ε {f(x['epsilon'], 2)}, {f(x['epsilon_check'], 2)} by {x['check_accountant']}" for x in p.get("models", []) if x["dp"])
                 if p.get("status") == "ok" else f"{p.get('status')}: {p.get('reason')}"))
    pr = report.get("protection", {})
    rows.append(("protection", "; ".join(f"c{x['compartment']}: {x['protection']}" for x in pr["compartments"])
                 if pr.get("status") == "ok" else f"{pr.get('status')}: {pr.get('reason')}"))
    return rows
