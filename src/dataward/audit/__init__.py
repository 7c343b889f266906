"""The audit: quality, replication, membership inference, forgetting and privacy of a ward, as JSON and HTML.

:func:`audit_ward` runs every section it can for a ward and returns a JSON-ready dict with stable keys (documented in
docs/audit.md). A section the ward cannot support (no held-out data, no guard, nothing forgotten, no DP model) is kept
with ``"status": "skipped"`` and a ``"reason"``; an unexpected failure is kept as ``"status": "error"`` unless
``strict=True``. Metrics live in :mod:`dataward.audit.metrics`, feature networks in :mod:`dataward.audit.features`,
the HTML page in :mod:`dataward.audit.report`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from dataward.audit import metrics as M
from dataward.audit.features import (
    FeatureExtractor,
    FeatureNet,
    FeatureNetConfig,
    digits_feature_net,
    inception_features,
    module_features,
)
from dataward.audit.metrics import (
    AttackResult,
    Replication,
    downstream_accuracy,
    forgetting_attack,
    frechet_distance,
    loss_attack,
    pia,
    recompute_epsilon,
    replication,
)
from dataward.data import Dataset, load_source
from dataward.errors import DatawardError
from dataward.training.privacy import other_accountant

SCHEMA = "dataward.audit/1"
SECTIONS = ("quality", "replication", "membership", "forgetting", "privacy")

__all__ = [
    "AttackResult", "FeatureNet", "FeatureNetConfig", "Replication", "SCHEMA", "SECTIONS", "audit_ward", "digits_feature_net",
    "downstream_accuracy", "forgetting_attack", "frechet_distance", "inception_features", "loss_attack", "module_features",
    "pia", "recompute_epsilon", "replication",
]


class _Skip(Exception):
    """A section that does not apply to this ward; the message is the reason."""


def _subset(data: Dataset, count: int, seed: int) -> Dataset:
    """A seeded random subset of ``count`` examples (all if fewer)."""
    if len(data) <= count:
        return data
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return data.select([data.ids[i] for i in rows.tolist()])


def _to_signed(images: torch.Tensor) -> torch.Tensor:
    """Ward samples are in [0, 1]; metrics take [-1, 1]."""
    return images.float() * 2.0 - 1.0


def _pick_features(ward, heldout: Dataset | None, features: FeatureExtractor | torch.nn.Module | None, inception: str | Path | None):
    if inception is not None:
        return inception_features(inception)
    if isinstance(features, torch.nn.Module):
        return module_features(features)
    if features is not None:
        return features
    data = str(getattr(getattr(ward, "config", None), "data", ""))
    if data.startswith("digits") or heldout is not None and tuple(heldout.shape) == (1, 8, 8):
        return digits_feature_net()
    raise _Skip("no feature network for this data: pass features= (a torch module) or inception= (a local safetensors file)")


def _forgotten(ward) -> tuple[Dataset, dict[str, int]] | None:
    """The forgotten samples (images re-read from the ward's data source; the ward erased its copies) and their compartments."""
    if hasattr(ward, "forgotten_data"):
        data = ward.forgotten_data()
        if data is None or len(data) == 0:
            return None
        where = getattr(ward, "forgotten_compartments", lambda: {})()
        return data, dict(where)
    ledger = getattr(ward, "ledger", None)
    if ledger is None or not hasattr(ledger, "forgotten_ids"):
        raise _Skip("the ward does not expose its forgotten samples")
    ids = list(ledger.forgotten_ids())
    if not ids:
        return None
    spec = str(ward.config.data)
    if spec == "dataset":
        raise _Skip(f"{len(ids)} forgotten samples, but the ward was made from an in-memory dataset, so their images cannot be re-read")
    source = load_source(spec)
    known = [i for i in ids if i in set(source.ids)]
    if not known:
        raise _Skip(f"none of the {len(ids)} forgotten IDs is in the data source {spec!r} any more")
    data = source.select(known).resized(ward.config.image_size, ward.config.channels)
    rows = ledger.sample_rows(known)
    return data, {i: int(rows[i][0]) for i in known}


def _section(name: str, report: dict, timings: dict, strict: bool, run: Callable[[], dict]) -> None:
    started = time.perf_counter()
    try:
        report[name] = {"status": "ok", **run()}
    except _Skip as skip:
        report[name] = {"status": "skipped", "reason": str(skip)}
    except DatawardError as error:
        if strict:
            raise
        report[name] = {"status": "skipped", "reason": str(error)}
    except Exception as error:  # an audit reports what it could not measure instead of losing the other sections
        if strict:
            raise
        report[name] = {"status": "error", "reason": f"{type(error).__name__}: {error}"}
    timings[name] = round(time.perf_counter() - started, 3)


def audit_ward(
    ward,
    n: int = 1000,
    *,
    seed: int = 0,
    steps: int = 50,
    sampler: str | None = None,
    grid: int = 64,
    members: int = 300,
    timesteps: tuple[int, ...] = M.DEFAULT_TIMESTEPS,
    features: FeatureExtractor | torch.nn.Module | None = None,
    inception: str | Path | None = None,
    heldout: Dataset | None = None,
    guard: bool | None = None,
    verify: bool = False,
    html: str | Path | None = None,
    strict: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Audit a ward: quality, replication, membership inference, forgetting and privacy. Returns the JSON-ready report.

    ``n`` samples are drawn from the composed model (seed ``seed``, ``steps`` sampler steps) for FD, CAS and
    replication; ``grid`` more per compartment for the pictures and per-compartment FD. Membership inference
    attacks each compartment's denoiser with up to ``members`` of its training samples against the held-out set
    (raw, and guarded when the ward has guards and ``guard`` is not False). ``verify=True`` adds the bitwise forgetting
    certificate (retrains every model: slow). ``features``/``inception`` replace the digits feature net; ``heldout``
    replaces the ward's held-out set. ``html`` also writes the HTML report there. Keys: docs/audit.md.
    """
    say = progress or (lambda message: None)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    artifacts: dict[str, Any] = {}
    compartments = list(ward.compartments())
    status = ward.status() if hasattr(ward, "status") else {}
    train = ward.training_data()
    heldout = heldout if heldout is not None else ward.heldout_data()
    model_inputs = getattr(ward, "model_inputs", lambda images: images)  # images as the denoisers see them (latents in a latent ward)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "ward": {
            "path": str(getattr(ward, "path", "")),
            "data": str(getattr(getattr(ward, "config", None), "data", "")),
            "compartments": compartments,
            "training_samples": len(train),
            "heldout_samples": None if heldout is None else len(heldout),
            "forgotten_samples": int(status.get("forgotten", 0) or 0),
        },
        "settings": {"n": n, "seed": seed, "steps": steps, "sampler": sampler, "grid": grid, "members": members, "timesteps": list(timesteps)},
    }

    # sampling -------------------------------------------------------------------------------------------------------
    say(f"sampling {n} images")
    t0 = time.perf_counter()
    kwargs = {"seed": seed, "steps": steps} | ({"sampler": sampler} if sampler else {})
    result = ward.sample(n, **kwargs)
    generated = _to_signed(result.images)  # (N, C, H, W) in [-1, 1]
    per_compartment: dict[int, torch.Tensor] = {}
    if len(compartments) > 1 and grid > 0:
        for c in compartments:
            try:
                per_compartment[c] = _to_signed(ward.sample(grid, **kwargs | {"allowed": [c]}).images)
            except DatawardError as error:
                say(f"compartment {c}: {error}")
    attribution = result.attribution.float()
    report["sampling"] = {
        "n": len(generated),
        "seconds": round(time.perf_counter() - t0, 3),
        "weights": getattr(result, "weights", None),
        "sampler": getattr(result, "sampler", sampler),
        "compartments_used": [int(c) for c in result.compartments],
        "attribution_mean": attribution.mean(0).tolist(),
        "attribution_top1_share": np.bincount(attribution.argmax(1).numpy(), minlength=attribution.shape[1]).astype(float).__truediv__(len(attribution)).tolist(),
    }
    timings["sampling"] = report["sampling"]["seconds"]
    artifacts.update(generated=generated, labels=result.labels, attribution=attribution, per_compartment=per_compartment, compartments=compartments)

    feature_box: dict[str, Any] = {}

    def get_features():
        if "net" not in feature_box:
            feature_box["net"] = _pick_features(ward, heldout, features, inception)
        return feature_box["net"]

    # quality ----------------------------------------------------------------------------------------------------
    def quality() -> dict:
        if heldout is None:
            raise _Skip("no held-out reference set (digits wards have one; pass heldout= for other data)")
        net = get_features()
        say("quality: FD and CAS")
        ref = net(heldout.images)
        train_ref = _subset(train, max(len(generated), 2), seed)
        out: dict[str, Any] = {
            "feature_net": net.info() if hasattr(net, "info") else {"name": type(net).__name__, "heldout_accuracy": None},
            "fd": frechet_distance(net(generated), ref),
            "fd_train_vs_heldout": frechet_distance(net(train_ref.images), ref),
            "n_generated": len(generated),
            "n_reference": len(heldout),
            "fd_per_compartment": {str(c): frechet_distance(net(x), ref) for c, x in per_compartment.items() if len(x) >= 2},
        }
        if result.labels is not None and heldout.labels is not None and len(torch.unique(result.labels)) > 1:
            out["cas"] = downstream_accuracy(generated, result.labels, heldout.images, heldout.labels, seed=seed)
            out["cas_real"] = downstream_accuracy(train.images, train.labels, heldout.images, heldout.labels, seed=seed)
        else:
            out["cas"] = out["cas_real"] = None
            out["cas_reason"] = "the ward is unconditional or the samples have one label: CAS needs class-conditional samples"
        return out

    _section("quality", report, timings, strict, quality)

    # replication ------------------------------------------------------------------------------------------------
    def replication_section() -> dict:
        say("replication: nearest neighbours")
        try:
            net = get_features()
            copy = getattr(net, "copy_features", net)
        except _Skip:
            copy = None
        rep = replication(generated, train.images, features=copy)
        out = rep.summary()
        for pair in out["closest_pairs"]:
            pair["train_id"] = train.ids[pair["train"]]
        if heldout is not None:
            base = replication(heldout.images, train.images, features=copy, top_k=0)
            out["heldout_baseline"] = {"replication_rate": base.replication_rate, "cosine_share": base.cosine_share, "nearest_l2_median": float(np.median(base.nearest_l2))}
            artifacts["heldout_nearest_l2"] = base.nearest_l2
            artifacts["heldout_ratio"] = base.ratio
        artifacts.update(replication=rep, train_images=train.images)
        return out

    _section("replication", report, timings, strict, replication_section)

    # membership inference -----------------------------------------------------------------------------------------
    def membership() -> dict:
        if heldout is None:
            raise _Skip("no held-out non-members (digits wards have one; pass heldout=)")
        use_guard = guard if guard is not None else bool(getattr(getattr(ward, "config", None), "guard", False))
        attacks, skipped = [], []
        labels_known = heldout.labels is not None and train.labels is not None
        heldout_inputs = model_inputs(heldout.images)
        for c in compartments:
            data = ward.training_data(c) if _accepts_compartment(ward) else train
            member_set = _subset(data, members, seed + 1 + c)
            variants = [("raw", False)] + ([("guarded", True)] if use_guard else [])
            for name, guarded in variants:
                try:
                    eps = ward.denoiser(c, guard=guarded)
                except DatawardError as error:
                    skipped.append({"compartment": c, "denoiser": name, "reason": str(error)})
                    continue
                say(f"membership inference: compartment {c}, {name}")
                common = dict(
                    member_labels=member_set.labels if labels_known else None,
                    nonmember_labels=heldout.labels if labels_known else None,
                    timesteps=timesteps, seed=seed,
                )
                loss = loss_attack(eps, ward.scheduler, model_inputs(member_set.images), heldout_inputs, **common)
                pia_result = pia(eps, ward.scheduler, model_inputs(member_set.images), heldout_inputs, **common)
                attacks.append({"compartment": c, "denoiser": name, "loss": loss.summary(), "pia": pia_result.summary()})
        if not attacks:
            raise _Skip("no compartment has a servable denoiser: " + "; ".join(s["reason"] for s in skipped))
        worst = {
            f"{kind}_{attack}": max((a[attack]["auc"] for a in attacks if a["denoiser"] == kind), default=None)
            for kind in ("raw", "guarded") for attack in ("loss", "pia")
        }
        return {"attacks": attacks, "skipped": skipped, "worst_auc": worst}

    _section("membership", report, timings, strict, membership)

    # forgetting ---------------------------------------------------------------------------------------------------
    def forgetting() -> dict:
        found = _forgotten(ward)
        if found is None:
            raise _Skip("nothing has been forgotten in this ward")
        if heldout is None:
            raise _Skip("no held-out samples to compare the forgotten ones with")
        data, where = found
        say(f"forgetting: {len(data)} forgotten samples")
        out: dict[str, Any] = {"forgotten": len(data), "attacks": []}
        # one timestep per compartment, chosen without looking at the forgotten samples (a sweep over a handful of
        # them would pick the luckiest t): the membership attack's best t for that compartment, else FORGETTING_T
        membership_t = {a["compartment"]: a["loss"]["best_t"] for a in report.get("membership", {}).get("attacks", []) if a["denoiser"] == "raw"}
        pairs = []
        for c in sorted(set(where.values())):
            ids = [i for i in data.ids if where.get(i) == c]
            subset = data.select(ids)
            try:
                eps = ward.denoiser(c)
            except DatawardError as error:
                out["attacks"].append({"compartment": c, "forgotten": len(ids), "reason": str(error)})
                continue
            labelled = subset.labels is not None and heldout.labels is not None
            t = membership_t.get(c, M.FORGETTING_T)
            attack = forgetting_attack(eps, ward.scheduler, model_inputs(subset.images), model_inputs(heldout.images),
                                       forgotten_labels=subset.labels if labelled else None,
                                       heldout_labels=heldout.labels if labelled else None, timesteps=(t,), seed=seed)
            pairs.append((attack.member_scores, attack.nonmember_scores))
            out["attacks"].append({"compartment": c, "forgotten": len(ids), "timestep": t,
                                   "timestep_from": "membership" if c in membership_t else "default", "loss": attack.summary()})
        if not pairs:
            raise _Skip("no compartment that held forgotten samples has a servable model")
        pooled = M.pooled_rank_auc(pairs)
        out |= {"auc": pooled["auc"], "null_sd": pooled["null_sd"], "z": pooled["z"], "consistent_with_unseen": abs(pooled["z"]) <= 1.96}
        if verify:
            say("forgetting: bitwise certificate (retraining every model)")
            certificate = ward.verify()
            out["certificate"] = {"ok": bool(certificate.get("ok")), "models": certificate.get("models", [])}
        else:
            out["certificate"] = None
            out["certificate_reason"] = "not run: pass verify=True (`--verify`) to retrain every model and compare weight hashes"
        return out

    _section("forgetting", report, timings, strict, forgetting)

    # privacy ------------------------------------------------------------------------------------------------------
    def privacy() -> dict:
        entry = status.get("privacy")
        if not entry:
            raise _Skip("no DP-trained model in this ward")
        return _privacy(entry)

    _section("privacy", report, timings, strict, privacy)

    report["timings"] = timings | {"total": round(time.perf_counter() - started, 3)}
    if html is not None:
        from dataward.audit.report import write_html

        write_html(html, report, artifacts)
    return report


def _accepts_compartment(ward) -> bool:
    import inspect

    try:
        return "compartment" in inspect.signature(ward.training_data).parameters
    except (TypeError, ValueError):
        return False


def _privacy(entry: dict) -> dict:
    """Per compartment, from :meth:`Ward.privacy`: the recorded (ε, δ) and ε recomputed by the other opacus accountant
    from the recorded (σ, q, steps) history; the ward's ε is the max over compartments (disjoint data: parallel
    composition), infinite when one compartment is not DP."""
    rows = []
    for compartment, m in entry["compartments"].items():
        if not isinstance(m, dict):  # "not DP"
            rows.append({"compartment": int(compartment), "dp": False, "epsilon": "inf", "delta": None, "accountant": None,
                         "noise_multiplier": None, "sample_rate": None, "steps": None, "clip": None,
                         "epsilon_check": None, "check_accountant": None})
            continue
        other = other_accountant(m["accountant"])
        rows.append({
            "compartment": int(compartment), "dp": True, "epsilon": m["epsilon"], "delta": m["delta"],
            "accountant": m["accountant"], "noise_multiplier": m["sigma"], "sample_rate": m["sample_rate"],
            "steps": m["steps"], "clip": m["clip"], "trainable_fraction": m.get("trainable_fraction"),
            "epsilon_check": recompute_epsilon(m["history"], m["delta"], other), "check_accountant": other,
        })
    return {"epsilon": entry["ward_epsilon"], "delta": entry["ward_delta"], "models": rows, "notes": list(entry.get("notes", []))}
