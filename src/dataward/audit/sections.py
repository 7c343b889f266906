"""The sections of the audit report, one function each, over an :class:`~dataward.audit.protocol.AuditedWard`.

:func:`draw_samples` draws the images every section shares; :func:`quality`, :func:`replication_section`,
:func:`membership`, :func:`forgetting` and :func:`privacy` each return a :class:`Measured` (the section's report fields
and the arrays its figures need) or raise :class:`Skip` with the reason the section does not apply; :class:`Sections`
runs them in order so that one failing section does not lose the others.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from dataward.audit.attacks import FORGETTING_T, forgetting_attack, loss_attack, mismatched_sources, pia, pooled_rank_auc
from dataward.audit.choices import AuditFeatures, Skip
from dataward.audit.metrics import downstream_accuracy, frechet_distance, recompute_epsilon, replication
from dataward.audit.protocol import AuditedWard, ServedDenoisers
from dataward.certificate import no_certificate_reason
from dataward.data import Dataset, load_source
from dataward.diffusion.sampling import Denoiser
from dataward.errors import DatawardError
from dataward.sampling.export import export_states
from dataward.training.privacy import other_accountant


@dataclass(frozen=True)
class Measured:
    """What a section measured."""

    fields: dict[str, Any]  # the section's report entries (after "status")
    artifacts: dict[str, Any] = field(default_factory=dict)  # arrays the HTML page draws; not part of the JSON


@dataclass(frozen=True)
class DrawnSamples:
    """The samples every section shares, in [-1, 1]."""

    generated: torch.Tensor  # (N, C, H, W) composed over every compartment
    labels: torch.Tensor | None  # (N,)
    attribution: torch.Tensor  # (N, K)
    per_compartment: dict[int, torch.Tensor]  # compartment -> (grid, C, H, W) from that compartment alone
    per_compartment_labels: dict[int, torch.Tensor | None] = field(default_factory=dict)  # compartment -> (grid,) their classes

    def artifacts(self, compartments: list[int]) -> dict[str, Any]:
        """The arrays the HTML page draws the samples from."""
        return {"generated": self.generated, "labels": self.labels, "attribution": self.attribution,
                "per_compartment": self.per_compartment, "per_compartment_labels": self.per_compartment_labels, "compartments": compartments}


@dataclass(frozen=True)
class Audit:
    """What the sections read: the ward, its data, the shared samples and the settings of :func:`dataward.audit.audit_ward`."""

    ward: AuditedWard
    compartments: list[int]
    train: Dataset  # every live training sample
    heldout: Dataset | None  # the non-members / reference set
    samples: DrawnSamples
    features: Callable[[], AuditFeatures]  # resolved on first use and kept; raises Skip when there is none
    seed: int
    steps: int  # sampling steps of the audit's samples
    members: int  # training samples attacked per compartment, at most
    timesteps: tuple[int, ...]  # the attacks' sweep
    guard: bool  # also attack the guarded denoisers
    verify: bool  # add the bitwise forgetting certificate
    say: Callable[[str], None]

    def require_heldout(self, reason: str) -> Dataset:
        """The held-out set, or Skip with ``reason``."""
        if self.heldout is None:
            raise Skip(reason)
        return self.heldout


@dataclass
class Sections:
    """Runs the sections in order, keeping each one's report entry, seconds and artifacts."""

    strict: bool  # re-raise unexpected errors (and DatawardError) instead of reporting them
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, Any] = field(default_factory=dict)

    def run(self, name: str, measure: Callable[[], Measured]) -> None:
        """Measure one section: ``"status": "ok"`` and its fields, or ``"skipped"``/``"error"`` with the reason."""
        started = time.perf_counter()
        try:
            measured = measure()
            self.entries[name] = {"status": "ok", **measured.fields}
            self.artifacts.update(measured.artifacts)
        except Skip as skip:
            self.entries[name] = {"status": "skipped", "reason": str(skip)}
        except DatawardError as error:
            if self.strict:
                raise
            self.entries[name] = {"status": "skipped", "reason": str(error)}
        except Exception as error:  # an audit reports what it could not measure instead of losing the other sections
            if self.strict:
                raise
            self.entries[name] = {"status": "error", "reason": f"{type(error).__name__}: {error}"}
        self.timings[name] = round(time.perf_counter() - started, 3)


def subset(data: Dataset, count: int, seed: int) -> Dataset:
    """A seeded random subset of ``count`` examples (all if fewer)."""
    if len(data) <= count:
        return data
    rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return data.select([data.ids[i] for i in rows.tolist()])


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """Ward samples are in [0, 1]; metrics take [-1, 1]."""
    return images.float() * 2.0 - 1.0


def ward_summary(ward: AuditedWard, compartments: list[int], train: Dataset, heldout: Dataset | None) -> dict[str, Any]:
    """The report's ``ward`` entry: where it is, its data, how many samples it has, holds out and forgot, and its exports
    (copies outside the ward, each with whether a forget or add made it stale)."""
    return {
        "path": str(ward.path),
        "data": str(ward.config.data),
        "compartments": compartments,
        "training_samples": len(train),
        "heldout_samples": None if heldout is None else len(heldout),
        "forgotten_samples": len(ward.ledger.forgotten_ids()),
        "exports": export_states(ward.ledger),
    }


def draw_samples(ward: AuditedWard, n: int, grid: int, compartments: list[int], *, seed: int, steps: int,
                 sampler: str | None, say: Callable[[str], None]) -> tuple[dict[str, Any], DrawnSamples]:
    """``n`` composed samples and ``grid`` per compartment (when there are several): the ``sampling`` entry and the samples."""
    say(f"sampling {n} images")
    started = time.perf_counter()
    result = ward.sample(n, seed=seed, steps=steps, sampler=sampler)
    per_compartment: dict[int, torch.Tensor] = {}
    per_compartment_labels: dict[int, torch.Tensor | None] = {}
    if len(compartments) > 1 and grid > 0:
        for c in compartments:
            try:
                alone = ward.sample(grid, seed=seed, steps=steps, sampler=sampler, allowed=[c])
                per_compartment[c], per_compartment_labels[c] = to_signed(alone.images), alone.labels
            except DatawardError as error:
                say(f"compartment {c}: {error}")
    attribution = result.attribution.float()  # (N, K)
    top1 = np.bincount(attribution.argmax(1).numpy(), minlength=attribution.shape[1]).astype(float) / len(attribution)
    entry = {
        "n": len(result.images),
        "seconds": round(time.perf_counter() - started, 3),
        "weights": result.weights,
        "sampler": result.sampler,
        "compartments_used": [int(c) for c in result.compartments],
        "attribution_mean": attribution.mean(0).tolist(),
        "attribution_top1_share": top1.tolist(),
    }
    return entry, DrawnSamples(to_signed(result.images), result.labels, attribution, per_compartment, per_compartment_labels)


def quality(audit: Audit) -> Measured:
    """FD of the composed and per-compartment samples to the held-out set (training data as the floor), and CAS."""
    heldout = audit.require_heldout("no held-out reference set (digits wards have one; pass heldout= for other data)")
    net = audit.features()
    audit.say("quality: FD and CAS")
    generated, labels, train = audit.samples.generated, audit.samples.labels, audit.train
    ref = net.extract(heldout.images)
    train_ref = subset(train, max(len(generated), 2), audit.seed)
    out: dict[str, Any] = {
        "feature_net": net.info,
        "fd": frechet_distance(net.extract(generated), ref),
        "fd_train_vs_heldout": frechet_distance(net.extract(train_ref.images), ref),
        "n_generated": len(generated),
        "n_reference": len(heldout),
        "fd_per_compartment": {str(c): frechet_distance(net.extract(x), ref) for c, x in audit.samples.per_compartment.items() if len(x) >= 2},
    }
    if labels is not None and heldout.labels is not None and len(torch.unique(labels)) > 1:
        out["cas"] = downstream_accuracy(generated, labels, heldout.images, heldout.labels, seed=audit.seed)
        out["cas_real"] = downstream_accuracy(train.images, train.labels, heldout.images, heldout.labels, seed=audit.seed)
    else:
        out["cas"] = out["cas_real"] = None
        out["cas_reason"] = "the ward is unconditional or the samples have one label: CAS needs class-conditional samples"
    return Measured(out)


def replication_section(audit: Audit) -> Measured:
    """Nearest training images of the samples (Gu et al. ratio, feature cosine), with held-out real images as the baseline."""
    audit.say("replication: nearest neighbours")
    try:
        copy = audit.features().copy
    except Skip:
        copy = None
    train = audit.train
    rep = replication(audit.samples.generated, train.images, features=copy)
    out = rep.summary()
    for pair in out["closest_pairs"]:
        pair["train_id"] = train.ids[pair["train"]]
    artifacts: dict[str, Any] = {}
    if audit.heldout is not None:
        base = replication(audit.heldout.images, train.images, features=copy, top_k=0)
        out["heldout_baseline"] = {"replication_rate": base.replication_rate, "cosine_share": base.cosine_share, "nearest_l2_median": float(np.median(base.nearest_l2))}
        artifacts.update(heldout_nearest_l2=base.nearest_l2, heldout_ratio=base.ratio)
    return Measured(out, artifacts | {"replication": rep, "train_images": train.images})


def membership(audit: Audit) -> Measured:
    """Loss attack and PIA on each compartment's raw (and guarded) denoiser: its members vs the held-out set."""
    heldout = audit.require_heldout("no held-out non-members (digits wards have one; pass heldout=)")
    variants = [("raw", False)] + ([("guarded", True)] if audit.guard else [])
    labels_known = heldout.labels is not None and audit.train.labels is not None
    served = audit.ward.read()
    heldout_inputs = served.model_inputs(heldout.images)
    attacks, skipped = [], []
    for c in audit.compartments:
        member_set = subset(audit.ward.training_data(c), audit.members, audit.seed + 1 + c)
        member_inputs = served.model_inputs(member_set.images)
        for name, guarded in variants:
            try:
                eps = served.denoiser(c, guard=guarded)
            except DatawardError as error:
                skipped.append({"compartment": c, "denoiser": name, "reason": str(error)})
                continue
            audit.say(f"membership inference: compartment {c}, {name}")
            common = dict(
                member_labels=member_set.labels if labels_known else None,
                nonmember_labels=heldout.labels if labels_known else None,
                timesteps=audit.timesteps, seed=audit.seed,
            )
            loss = loss_attack(eps, audit.ward.scheduler, member_inputs, heldout_inputs, **common)
            pia_result = pia(eps, audit.ward.scheduler, member_inputs, heldout_inputs, **common)
            attacks.append({"compartment": c, "denoiser": name, "loss": loss.summary(), "pia": pia_result.summary()}
                           | mismatched_sources(member_set.ids, heldout.ids))
    if not attacks:
        raise Skip("no compartment has a servable denoiser: " + "; ".join(s["reason"] for s in skipped))
    worst = {
        f"{kind}_{attack}": max((a[attack]["auc"] for a in attacks if a["denoiser"] == kind and "invalid" not in a), default=None)
        for kind in ("raw", "guarded") for attack in ("loss", "pia")
    }
    return Measured({"attacks": attacks, "skipped": skipped, "worst_auc": worst})


def forgotten_samples(ward: AuditedWard) -> tuple[Dataset, dict[str, int]] | None:
    """The forgotten samples (images re-read from the ward's data source: the ward erased its copies) and their
    compartments; None when nothing was forgotten."""
    ids = ward.ledger.forgotten_ids()
    if not ids:
        return None
    spec = str(ward.config.data)
    if spec == "dataset":
        raise Skip(f"{len(ids)} forgotten samples, but the ward was made from an in-memory dataset, so their images cannot be re-read")
    source = load_source(spec)
    present = set(source.ids)
    known = [i for i in ids if i in present]
    if not known:
        raise Skip(f"none of the {len(ids)} forgotten IDs is in the data source {spec!r} any more")
    data = source.select(known).resized(ward.config.image_size, ward.config.channels)
    rows = ward.ledger.sample_rows(known)
    return data, {i: int(rows[i][0]) for i in known}


def forgetting(audit: Audit, membership_entry: dict[str, Any]) -> Measured:
    """Loss attack of the forgotten samples vs held-out under each compartment that held them, pooled; the certificate.

    One timestep per compartment, chosen without looking at the forgotten samples (a sweep over a handful of them would
    pick the luckiest t): the membership attack's best t for that compartment (``membership_entry``), else FORGETTING_T.
    """
    found = forgotten_samples(audit.ward)
    if found is None:
        raise Skip("nothing has been forgotten in this ward")
    heldout = audit.require_heldout("no held-out samples to compare the forgotten ones with")
    data, where = found
    audit.say(f"forgetting: {len(data)} forgotten samples")
    chosen_t = {a["compartment"]: a["loss"]["best_t"] for a in membership_entry.get("attacks", []) if a["denoiser"] == "raw"}
    attacks, pairs, served = [], [], audit.ward.read()
    for c in sorted(set(where.values())):
        forgotten = data.select([i for i in data.ids if where.get(i) == c])
        try:
            eps = served.denoiser(c)
        except DatawardError as error:
            attacks.append({"compartment": c, "forgotten": len(forgotten), "reason": str(error)})
            continue
        t = chosen_t.get(c, FORGETTING_T)
        attack = _forgetting_attack(audit, served, eps, forgotten, heldout, t)
        pairs.append((attack.member_scores, attack.nonmember_scores))
        attacks.append({"compartment": c, "forgotten": len(forgotten), "timestep": t,
                        "timestep_from": "membership" if c in chosen_t else "default", "loss": attack.summary()})
    if not pairs:
        raise Skip("no compartment that held forgotten samples has a servable model")
    pooled = pooled_rank_auc(pairs)
    out = {"forgotten": len(data), "attacks": attacks, "auc": pooled["auc"], "null_sd": pooled["null_sd"], "z": pooled["z"],
           "consistent_with_unseen": abs(pooled["z"]) <= 1.96}
    return Measured(out | certificate(audit))


def _forgetting_attack(audit: Audit, served: ServedDenoisers, eps: Denoiser, forgotten: Dataset, heldout: Dataset, t: int):
    """The loss attack at timestep ``t`` of ``forgotten`` (as members) vs ``heldout``, on the images the models see."""
    labelled = forgotten.labels is not None and heldout.labels is not None
    return forgetting_attack(eps, audit.ward.scheduler, served.model_inputs(forgotten.images), served.model_inputs(heldout.images),
                             forgotten_labels=forgotten.labels if labelled else None,
                             heldout_labels=heldout.labels if labelled else None, timesteps=(t,), seed=audit.seed)


def certificate(audit: Audit) -> dict[str, Any]:
    """The bitwise forgetting certificate when ``verify`` (retrains every model), else why it was not run."""
    if not audit.verify:
        earlier = earlier_certificate(audit.ward)
        if earlier is not None:
            return {"certificate": earlier}
        return {"certificate": None, "certificate_reason": no_certificate_reason(audit.ward.ledger)}
    audit.say("forgetting: bitwise certificate (retraining every model)")
    result = audit.ward.verify(progress=False)  # the audit reports its own progress
    return {"certificate": {"ok": result.ok, "models": [check.to_json() for check in result.models]}}


def earlier_certificate(ward: AuditedWard) -> dict[str, Any] | None:
    """The newest complete certificate in the ledger (``dataward verify``), if no model was registered and no ID was
    forgotten since: then it covers exactly the models served now."""
    events = [e["detail"] for e in ward.ledger.events_of("certificate") if e["detail"].get("complete")]
    if not events:
        return None
    latest = events[-1]
    if latest["latest_model"] != ward.ledger.latest_model_id() or latest["forgotten"] != len(ward.ledger.forgotten_ids()):
        return None
    return {"ok": bool(latest["ok"]), "models": latest["models"], "source": "an earlier dataward verify of the models served now"}


def privacy(ward: AuditedWard) -> Measured:
    """Per compartment, from :meth:`Ward.privacy`: the recorded (ε, δ) and ε recomputed by the other opacus accountant
    from the recorded (σ, q, steps) history; the ward's ε is the max over compartments (disjoint data: parallel
    composition), infinite when one compartment is not DP."""
    entry = ward.privacy()
    if not entry:
        raise Skip("no DP-trained model in this ward")
    rows = [_privacy_row(int(compartment), record) for compartment, record in entry["compartments"].items()]
    return Measured({"epsilon": entry["ward_epsilon"], "delta": entry["ward_delta"], "models": rows, "notes": list(entry.get("notes", []))})


def _privacy_row(compartment: int, record: dict | str) -> dict[str, Any]:
    """One compartment's privacy row; ``record`` is ``"not DP"`` or its DP record."""
    if not isinstance(record, dict):
        return {"compartment": compartment, "dp": False, "epsilon": "inf", "delta": None, "accountant": None,
                "noise_multiplier": None, "sample_rate": None, "steps": None, "clip": None,
                "epsilon_check": None, "check_accountant": None}
    other = other_accountant(record["accountant"])
    return {
        "compartment": compartment, "dp": True, "epsilon": record["epsilon"], "delta": record["delta"],
        "accountant": record["accountant"], "noise_multiplier": record["sigma"], "sample_rate": record["sample_rate"],
        "steps": record["steps"], "clip": record["clip"], "trainable_fraction": record.get("trainable_fraction"),
        "epsilon_check": recompute_epsilon(record["history"], record["delta"], other), "check_accountant": other,
    }
