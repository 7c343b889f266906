"""Tests of the audit: metrics on known cases, the feature net, the JSON schema and the HTML report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dataward.audit as M
from dataward.audit.features import FeatureNetConfig, digits_feature_net, inception_features, module_features
from dataward.data import load_source
from dataward.errors import DatawardError
from dataward.diffusion.sampling import make_training_scheduler


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory):
    """One cache dir for the whole session (DATAWARD_CACHE), so the feature net trains once."""
    root = tmp_path_factory.mktemp("dataward-cache")
    patch = pytest.MonkeyPatch()
    patch.setenv("DATAWARD_CACHE", str(root))
    yield root
    patch.undo()


@pytest.fixture(scope="session")
def feature_net(feature_cache):
    return digits_feature_net()


@pytest.fixture(scope="session")
def digits():
    return load_source("digits"), load_source("digits:heldout")


@pytest.fixture(scope="session")
def scheduler():
    return make_training_scheduler()


def memorizing_denoiser(bank: torch.Tensor, scheduler):
    """Closed-form denoiser that knows ``bank`` (M, C, H, W): ε implied by the nearest bank image at x_t."""
    alpha_bar = scheduler.alphas_cumprod

    def eps(x_t, t, y=None):
        a = alpha_bar[int(t)]
        d = torch.cdist(x_t.flatten(1), (a.sqrt() * bank).flatten(1))  # (N, M)
        x0 = bank[d.argmin(dim=1)]
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    return eps


# ------------------------------------------------------------------------------------------------------------ features


def test_feature_net_is_accurate_cached_and_deterministic(feature_cache, feature_net):
    assert feature_net.heldout_accuracy >= 0.95
    assert feature_net.path is not None and feature_net.path.is_relative_to(feature_cache)
    assert (feature_net.path / "model.safetensors").is_file() and (feature_net.path / "config.json").is_file()
    again = digits_feature_net()  # from the cache
    assert again.heldout_accuracy == feature_net.heldout_accuracy
    for a, b in zip(feature_net.module.state_dict().values(), again.module.state_dict().values()):
        assert torch.equal(a, b)
    assert FeatureNetConfig(seed=1).key() != FeatureNetConfig().key()


def test_feature_net_retrains_bitwise(feature_net):
    """Training is deterministic: a short retrain twice gives identical bytes."""
    from dataward.audit.features import train_feature_net

    config = FeatureNetConfig(epochs=1, width=8, feature_dim=16)
    a, b = train_feature_net(config), train_feature_net(config)
    for x, y in zip(a.module.state_dict().values(), b.module.state_dict().values()):
        assert torch.equal(x, y)


def test_user_module_and_missing_inception(tmp_path):
    extractor = module_features(torch.nn.Flatten(), image_shape=(1, 4, 4))
    assert extractor(torch.zeros(3, 1, 8, 8)).shape == (3, 16)
    with pytest.raises(DatawardError, match="nope.safetensors"):
        inception_features(tmp_path / "nope.safetensors")


# ---------------------------------------------------------------------------------------------------------- quality


def test_frechet_distance_zero_for_itself_and_monotone_in_noise(feature_net, digits):
    _, heldout = digits
    reference = feature_net(heldout.images)
    assert M.frechet_distance(reference, reference) == pytest.approx(0.0, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(heldout.images.shape, generator=generator)
    distances = [M.frechet_distance(feature_net((heldout.images + s * noise).clamp(-1, 1)), reference) for s in (0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip(distances, distances[1:])), distances
    assert distances[0] > 0.1


def test_frechet_distance_matches_gaussian_closed_form():
    """Two Gaussians with known means and diagonal covariances: FD = |Δμ|² + Σ (σ_a − σ_b)²."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    b = torch.randn(20000, 3, generator=generator, dtype=torch.float64) * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64) + 1.0
    expected = 3 * 1.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=0.05)


def test_downstream_accuracy_real_vs_shuffled_labels(digits):
    train, heldout = digits
    assert M.downstream_accuracy(train.images, train.labels, heldout.images, heldout.labels) > 0.9
    shuffled = train.labels[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]
    assert M.downstream_accuracy(train.images, shuffled, heldout.images, heldout.labels) < 0.3


# ------------------------------------------------------------------------------------------------------ replication


def test_replication_flags_planted_copies_not_heldout(feature_net, digits):
    train, heldout = digits
    generator = torch.Generator().manual_seed(0)
    copies = (train.images[:20] + 0.05 * torch.randn(20, 1, 8, 8, generator=generator)).clamp(-1, 1)
    generated = torch.cat([copies, heldout.images[:80]])
    result = M.replication(generated, train.images, features=feature_net.copy_features, top_k=20)
    assert result.replicated[:20].all() and not result.replicated[20:].any()
    assert result.replication_rate == pytest.approx(0.2)
    assert np.array_equal(result.nearest_index[:20], np.arange(20))
    assert set(result.closest.tolist()) == set(range(20))
    assert (result.cosine[:20] > result.cosine_threshold).all()
    assert (result.cosine[20:] > result.cosine_threshold).mean() <= 0.03
    assert np.all(result.nearest_l2 <= result.second_l2)


def test_replication_of_heldout_is_low(feature_net, digits):
    train, heldout = digits
    result = M.replication(heldout.images, train.images, features=feature_net.copy_features)
    assert result.replication_rate == 0.0
    assert result.cosine_share <= 0.02
    assert set(result.summary()) >= {"replication_rate", "cosine_share", "closest_pairs"}


# ----------------------------------------------------------------------------------------------- membership inference


def _split(images: torch.Tensor, seed: int = 0):
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    half = len(images) // 2
    return images[order[:half]], images[order[half:]]


def test_mia_is_chance_for_a_model_that_saw_neither(digits, scheduler):
    _, heldout = digits
    members, nonmembers = _split(heldout.images)
    other = memorizing_denoiser(load_source("printed:count=64").images, scheduler)  # memorized printed digits only
    for attack in (M.loss_attack, M.pia):
        result = attack(other, scheduler, members, nonmembers, timesteps=(50, 200))
        assert abs(result.auc - 0.5) < 0.1, (attack.__name__, result.auc)
        assert result.tpr_at_1pct_fpr < 0.1


def test_mia_detects_a_memorizing_model(digits, scheduler):
    _, heldout = digits
    members, nonmembers = _split(heldout.images[:128])
    memorized = memorizing_denoiser(members, scheduler)
    for attack in (M.loss_attack, M.pia):
        result = attack(memorized, scheduler, members, nonmembers)
        assert result.auc > 0.97, (attack.__name__, result.auc)
        assert result.tpr_at_1pct_fpr > 0.8
        assert result.best_t in M.DEFAULT_TIMESTEPS
        assert result.fpr[0] == 0 and result.tpr[-1] == 1
    assert M.forgetting_attack(memorized, scheduler, members, nonmembers).auc > 0.97


def test_loss_attack_is_seeded(digits, scheduler):
    _, heldout = digits
    members, nonmembers = _split(heldout.images[:64])
    eps = memorizing_denoiser(members[:8], scheduler)
    a = M.loss_attack(eps, scheduler, members, nonmembers, timesteps=(300,), seed=3)
    b = M.loss_attack(eps, scheduler, members, nonmembers, timesteps=(300,), seed=3)
    c = M.loss_attack(eps, scheduler, members, nonmembers, timesteps=(300,), seed=4)
    assert np.array_equal(a.member_scores, b.member_scores)
    assert not np.array_equal(a.member_scores, c.member_scores)


def test_roc_known_values():
    auc, tpr_low, fpr, tpr = M.roc(np.array([3.0, 4.0]), np.array([1.0, 2.0]))
    assert auc == 1.0 and tpr_low == 1.0
    auc, _, _, _ = M.roc(np.array([1.0, 3.0]), np.array([2.0, 4.0]))
    assert auc == pytest.approx(0.25)


def test_pooled_rank_auc_is_the_roc_auc_for_one_model_and_has_the_uniform_null():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(0.5, 1, 40), rng.normal(0, 1, 300)
    auc, *_ = M.roc(members, nonmembers)
    pooled = M.pooled_rank_auc([(members, nonmembers)])
    assert pooled["auc"] == pytest.approx(auc, abs=1e-12) and pooled["n"] == 40
    # never-seen members from the non-members' distribution, in 5 models: within 0.5 ± 1.96 null_sd most of the time
    inside = 0
    for trial in range(200):
        pairs = [(rng.normal(0, 1, 2), rng.normal(0, 1, 300)) for _ in range(5)]
        result = M.pooled_rank_auc(pairs)
        assert result["null_sd"] == pytest.approx(1 / np.sqrt(120))
        inside += abs(result["z"]) <= 1.96
    assert 0.9 <= inside / 200 <= 0.99


def test_recompute_epsilon_accountants_agree_roughly():
    prv = M.recompute_epsilon([(1.0, 0.05, 1000)], 1e-5, "prv")
    rdp = M.recompute_epsilon([(1.0, 0.05, 1000)], 1e-5, "rdp")
    assert 0 < prv <= rdp * 1.01  # PRV is tighter than RDP
    assert prv == pytest.approx(rdp, rel=0.3)
    with pytest.raises(DatawardError, match="sigma"):
        M.recompute_epsilon([(0.0, 0.05, 10)], 1e-5)


# ------------------------------------------------------------------------------------------------- audit_ward + report


@pytest.fixture(scope="session")
def audited(feature_net, tmp_path_factory):
    """One audit of the closed-form stand-in ward (a memorizing and a Gaussian compartment, 40 leaky forgotten IDs)."""
    from dataward.audit import audit_ward
    from dataward.audit.standin import StandInWard

    privacy = {"ward_epsilon": "inf", "ward_delta": 1.0, "notes": ["some compartments are not DP-trained"], "compartments": {
        "0": "not DP",
        "1": {"epsilon": 5.0, "delta": 1e-5, "accountant": "prv", "sigma": 1.0, "sample_rate": 0.05, "steps": 1000, "clip": 1.0,
              "history": [[1.0, 0.05, 1000]], "trainable_fraction": 0.1}}}  # the shape of Ward.privacy()
    ward = StandInWard(per_compartment=150, forgotten=40, privacy=privacy)
    html = tmp_path_factory.mktemp("report") / "report.html"
    report = audit_ward(ward, n=120, steps=10, grid=16, members=100, timesteps=(10, 100), html=html, strict=True)
    return report, html


def test_audit_report_schema_is_stable(audited):
    import json

    from dataward.audit import SCHEMA
    from dataward.audit.report import ATTACK_KEYS, REPORT_KEYS, SECTION_KEYS

    report, _ = audited
    assert tuple(report) == REPORT_KEYS == (
        "schema", "ward", "settings", "sampling", "quality", "replication", "membership", "forgetting", "privacy", "protection", "timings"
    )
    assert report["schema"] == SCHEMA == "dataward.audit/3"
    for section, keys in SECTION_KEYS.items():
        assert report[section]["status"] == "ok", (section, report[section])
        assert set(keys) <= set(report[section]), (section, set(keys) - set(report[section]))
    for attack in report["membership"]["attacks"]:
        assert set(attack) == {"compartment", "denoiser", "loss", "pia"}
        assert tuple(attack["loss"]) == ATTACK_KEYS
    json.loads(json.dumps(report))  # JSON-ready as is


def test_the_report_says_what_protects_each_compartment(audited):
    """Issues 22 and 17: per compartment, whether DP, a guard or nothing protects its data, and whether it memorises."""
    report, html = audited
    rows = {row["compartment"]: row for row in report["protection"]["compartments"]}
    # the stand-in's compartment 0 is the optimal denoiser of its data (its samples are copies); compartment 1 never copies
    assert rows[0]["memorises"] is True and rows[0]["unguarded_replication"] >= 0.5
    assert rows[1]["memorises"] is False and rows[1]["unguarded_replication"] < 0.05
    assert rows[0]["dp"] is None and rows[0]["protection"].startswith("neither DP nor a guard: exact forgetting and access rights only; MEMORISES: ")
    assert rows[0]["protection"].endswith("of its unguarded samples are copies (train guards: dataward guard WARD)")
    assert rows[1]["dp"] == {"epsilon": 5.0, "delta": 1e-5} and rows[1]["protection"].startswith("DP (ε = 5.000, δ = 1.00e-05); does not memorise (")
    assert rows[0]["guard_steered_share"] is None and rows[0]["guarded_replication"] is None  # the stand-in has no guards
    assert report["protection"]["probe"] == 32 and report["protection"]["memorises_at"] == 0.05
    page = html.read_text(encoding="utf-8")
    assert "What protects each compartment" in page and "DP (ε = 5.000, δ = 1.00e-05)" in page and "copies unguarded" in page
    from dataward.ward_status import describe_protection

    # issue 36: a guard that never steers protects nothing, measured by the audit or (unaudited) by its own training
    nothing = "a guard that {}, so it protects nothing (train it longer: dataward guard WARD --steps N)"
    assert describe_protection(None, True, 0.0) == nothing.format("steered on none of the audit's checks")
    assert describe_protection(None, True, sure_on_members=0.0) == nothing.format("is never sure on its members at any t")
    assert describe_protection(None, True, sure_on_members=0.3) == "guard (when sampled with --guard)"
    assert describe_protection({"epsilon": 1.0, "delta": 1e-4}, True) == "DP (ε = 1.000, δ = 1.00e-04) + guard (when sampled with --guard)"
    assert describe_protection(None, True, 0.25, 0.125) == "guard (steered 25.0% of its checks); MEMORISES: 12.5% of its unguarded samples are copies"


def test_audit_numbers_on_the_stand_in(audited):
    report, _ = audited
    by_compartment = {a["compartment"]: a for a in report["membership"]["attacks"]}
    assert by_compartment[0]["loss"]["auc"] > 0.97  # the memorizer
    assert report["membership"]["worst_auc"]["raw_loss"] == by_compartment[0]["loss"]["auc"]
    forgetting = report["forgetting"]
    assert forgetting["auc"] > 0.97 and not forgetting["consistent_with_unseen"]  # the stand-in's "forgotten" IDs are still memorized
    assert report["replication"]["replication_rate"] > 0.2  # half the samples come from the memorizer
    assert report["replication"]["heldout_baseline"]["replication_rate"] == 0.0
    assert report["quality"]["fd"] > 0 and report["quality"]["feature_net"]["heldout_accuracy"] >= 0.95
    assert report["privacy"]["epsilon"] == "inf"  # compartment 0 is not DP
    assert [m["dp"] for m in report["privacy"]["models"]] == [False, True]
    check = report["privacy"]["models"][1]
    assert check["epsilon"] == 5.0
    assert check["check_accountant"] == "rdp" and check["epsilon_check"] == pytest.approx(M.recompute_epsilon([(1.0, 0.05, 1000)], 1e-5, "rdp"))
    assert report["sampling"]["attribution_mean"] == pytest.approx([0.5, 0.5])


def test_the_privacy_table_says_which_epsilon_is_the_guarantee_and_why_the_check_differs(audited):
    """Issue 36: ε 9.996 (PRV) stood beside "ε (check)" 11.527 (RDP) with no word on which holds."""
    from dataward.audit.report import ACCOUNTANTS_NOTE, summary_rows

    report, html = audited
    page = html.read_text(encoding="utf-8")
    assert "ε (the guarantee)" in page and "RDP&#x27;s is looser" in page and "ε is the guarantee" in ACCOUNTANTS_NOTE
    row = dict(summary_rows(report))["privacy"]
    assert "(the guarantee); check by the other accountant (RDP is a looser upper bound, so higher): c1 ε 5.00" in row


def test_audit_numbers_are_those_of_the_one_function_audit(audited):
    """Same seeds, same numbers: the stand-in's figures as the audit of 649b6a6 (one 228-line function) gave them."""
    report, _ = audited
    gaussian = report["membership"]["attacks"][1]
    assert (gaussian["compartment"], gaussian["loss"]["best_t"]) == (1, 100)
    assert gaussian["loss"]["auc"] == pytest.approx(0.6794949494949494, abs=1e-12)
    assert gaussian["pia"]["auc"] == pytest.approx(0.7704040404040403, abs=1e-12)
    assert report["forgetting"]["attacks"][0]["timestep"] == 10 and report["forgetting"]["z"] == pytest.approx(10.954451150103322, rel=1e-9)
    quality = report["quality"]
    assert quality["fd"] == pytest.approx(56.253466317269385, rel=1e-6)
    assert quality["fd_per_compartment"] == pytest.approx({"0": 201.94259806370724, "1": 231.6322863600783}, rel=1e-6)
    assert (quality["cas"], quality["cas_real"]) == pytest.approx((0.7542087542087542, 0.9225589225589226), abs=1e-12)
    assert report["replication"]["cosine_median"] == pytest.approx(0.7621993938534075, rel=1e-6)
    assert report["replication"]["nearest_l2_median"] == pytest.approx(2.808020181792152, rel=1e-9)


def test_html_report_has_every_figure(audited):
    report, html = audited
    page = html.read_text()
    # 3 sample grids (composed + 2 compartments), attribution, 2 ROC figures, NN histograms, closest pairs
    assert page.count("<img ") == 8
    assert page.count("data:image/png;base64,") == 8
    assert "http://" not in page and "https://" not in page  # self-contained
    for heading in ("Samples", "Quality", "Replication", "Membership inference", "Forgetting", "Privacy budget"):
        assert f"<h2>{heading}</h2>" in page


def test_sections_degrade_gracefully(feature_net):
    """A ward without held-out data, forgetting or privacy: those sections are skipped with reasons, not errors."""
    from dataward.audit import audit_ward
    from dataward.audit.report import render_html
    from dataward.audit.standin import StandInWard

    ward = StandInWard(per_compartment=40)
    ward.heldout_data = lambda: None
    report = audit_ward(ward, n=30, steps=5, grid=0, timesteps=(50,))
    for section in ("quality", "membership", "privacy", "forgetting"):
        assert report[section]["status"] == "skipped" and report[section]["reason"], section
    assert report["replication"]["status"] == "ok"
    assert "skipped:" in render_html(report, {})


def test_the_ward_and_the_stand_in_satisfy_the_audit_protocol(tmp_path):
    """The audit reads a ward only through AuditedWard: the real Ward and the stand-in both have every member."""
    from dataward.audit import AuditedWard
    from dataward.audit.standin import StandInWard
    from dataward.ward import Ward

    ward = Ward.create(tmp_path / "w", "digits:subset=20")
    try:
        assert isinstance(ward, AuditedWard)
    finally:
        ward.close()
    assert isinstance(StandInWard(per_compartment=5), AuditedWard)
    assert not isinstance(object(), AuditedWard)



def test_the_worst_mia_card_is_the_worst_over_attacks():
    """Issue 22: the card showed the raw loss attack's AUC (0.587) while PIA's was higher (0.633)."""
    from dataward.audit.report import render_html

    membership = {"status": "ok", "attacks": [], "skipped": [],
                  "worst_auc": {"raw_loss": 0.587, "raw_pia": 0.633, "guarded_loss": None, "guarded_pia": None}}
    page = render_html({"membership": membership, "settings": {"n": 0}, "timings": {}}, {})
    card = page[page.index("Worst MIA AUC"):][:300]
    assert "0.633" in card and "PIA, raw" in card and "0.587" not in card


def test_a_certificate_run_before_the_audit_is_reported_until_the_models_change(ward_copy):
    """Issue 22: the demo runs `verify`, then the audit said the certificate was "not run" (with raw backticks)."""
    from dataward.audit.report import render_html
    from dataward.audit.sections import earlier_certificate

    assert earlier_certificate(ward_copy) is None
    assert ward_copy.verify().ok
    earlier = earlier_certificate(ward_copy)
    assert earlier["ok"] and earlier["models"] == sorted(r.id for k in ("denoiser", "router") for r in ward_copy.served(k).values())
    page = render_html({"forgetting": {"status": "ok", "attacks": [], "auc": 0.5, "forgotten": 1, "null_sd": 0.1, "z": 0.0,
                                       "consistent_with_unseen": True, "certificate": earlier}, "settings": {"n": 0}, "timings": {}}, {})
    assert "every served model equals its from-scratch retrain" in page and "`" not in page[page.index("Bitwise"):]
    ward_copy.forget([ward_copy.training_data(0).ids[0]])  # new models: the old certificate no longer speaks for them
    assert earlier_certificate(ward_copy) is None


def test_without_a_covering_certificate_the_audit_says_what_the_latest_verify_checked(ward_copy):
    """Issue 36: the demo said "certificate OK" (a verify of the forget's compartments, before DP fine-tuning trained new
    models) while its audit said "certificate not run": both now say what was checked."""
    from dataward.audit.report import summary_rows
    from dataward.certificate import no_certificate_reason

    reason = no_certificate_reason(ward_copy.ledger)
    assert reason.startswith("not run by this audit") and "latest" not in reason
    assert ward_copy.verify(compartments=[0]).ok
    reason = no_certificate_reason(ward_copy.ledger)
    assert "some compartments only: OK" in reason and "after it" not in reason
    ward_copy.forget([ward_copy.training_data(0).ids[0]])
    reason = no_certificate_reason(ward_copy.ledger)
    assert "some compartments only: OK, and models were trained or IDs forgotten after it" in reason
    forgetting = {"status": "ok", "attacks": [], "auc": 0.5, "forgotten": 1, "null_sd": 0.1, "z": 0.0, "certificate": None,
                  "certificate_reason": reason}
    assert dict(summary_rows({"forgetting": forgetting}))["forgetting"].endswith("certificate " + reason)


def test_membership_across_different_sources_is_not_counted_as_memorisation():
    """Issue 22: a DP compartment of printed digits showed AUC ~0.8 against handwritten held-out digits."""
    from dataward.audit.attacks import mismatched_sources

    assert "printed" in mismatched_sources(("printed:0:000001", "printed:0:000002"), ("digits:1600", "digits:1601"))["invalid"]
    assert mismatched_sources(("digits:0001",), ("digits:1600",)) == {}
    assert mismatched_sources(("square/001.png",), ("digits:1600",)) == {}  # IDs without a source name: nothing is claimed


def test_figures_label_their_axes_and_say_when_a_roc_rests_on_few_samples(monkeypatch):
    """Issue 22: the ratio histogram had no y-label and a legend over its bars; a forgetting ROC of 1-2 samples looked
    like a curve."""
    from dataward.audit import figures
    from dataward.audit.metrics import replication

    monkeypatch.setattr(figures, "_png", lambda fig: fig)  # keep the figure to look at it
    g = torch.Generator().manual_seed(0)
    rep = replication(torch.rand(12, 1, 8, 8, generator=g), torch.rand(30, 1, 8, 8, generator=g))
    fig = figures.nearest_figure(rep, None, None)
    ratio_axes = fig.axes[1]
    assert ratio_axes.get_ylabel() == "density"
    fig.canvas.draw()
    legend, bars = ratio_axes.get_legend().get_window_extent(), ratio_axes.get_window_extent()
    assert legend.x0 >= bars.x1 - 1  # the legend sits beside the plot
    summary = {"auc": 1.0, "best_t": 100, "n_members": 1, "roc": {"fpr": [0.0, 0.0, 1.0], "tpr": [0.0, 1.0, 1.0]}}
    roc = figures.roc_figure([("c0 forgotten loss", summary, 0, "-")], "forgotten vs held-out")
    assert any("only 1 member(s): a step, not a curve" in text.get_text() for text in roc.legends[0].get_texts())


def test_guarded_rows_identical_to_raw_are_said_once():
    from dataward.audit.report import render_html

    def attack(c, denoiser, auc):
        summary = {"auc": auc, "tpr_at_1pct_fpr": 0.0, "best_t": 10, "n_members": 20, "n_nonmembers": 20,
                   "roc": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]}}
        return {"compartment": c, "denoiser": denoiser, "loss": summary, "pia": dict(summary)}

    attacks = [attack(0, "raw", 0.6), attack(0, "guarded", 0.6), attack(1, "raw", 0.7), attack(1, "guarded", 0.55)]
    page = render_html({"membership": {"status": "ok", "attacks": attacks, "skipped": [], "worst_auc": {}}, "settings": {"n": 0}, "timings": {}}, {})
    section = page[page.index("<h2>Membership inference"):]
    assert section.count("<td>guarded</td>") == 2  # compartment 1's loss and PIA rows; compartment 0's are said once
    assert "Guarded = raw for compartment(s) 0" in section
