"""The per-user cache of public models (issue 36, item 3): a second ward with the same base spec copies it instead of
training it, with the same bytes; a tampered entry is detected and not used; verify checks the base's hash instead of
retraining it; `train` announces what it will train and whether the base is cached."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_ward
from dataward.store.checkpoints import META_FILE, STATE_FILE, WEIGHTS_FILE, checkpoint_hash
from dataward.config import CACHE_ENV
from dataward.training.basecache import CHECKPOINT_DIR, PublicModelCache
from dataward.training.forecast import forecast_training
from dataward.config import TrainConfig
from dataward.training.runner import JobRunner

PUBLIC = TrainConfig(steps=3, batch_size=20)


def _ward(path, **options):
    """A one-compartment ward fine-tuned from a tiny public base."""
    return make_ward(path, data="digits:subset=40", compartments=1, slices=1, router=False, base="printed:count=40", public_train=PUBLIC,
                     **options)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """An empty cache of public models for this test alone (it asserts a miss)."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "bases"


@pytest.fixture
def trained_kinds(monkeypatch) -> list[str]:
    """The kinds of model JobRunner.run trains from now on, in order."""
    kinds: list[str] = []
    run = JobRunner.run

    def recording(self, job, *args, **kwargs):
        kinds.append(job.lineage.kind)
        return run(self, job, *args, **kwargs)

    monkeypatch.setattr(JobRunner, "run", recording)
    return kinds


def _same_base(a, b) -> bool:
    """Whether two wards' bases hold the same bytes: weights, config and metadata files, and training state tensors
    (safetensors writes a file's metadata header in hash-map order, so that file's bytes vary between two trainings)."""
    folders = [w.path / w.served("public-denoiser")[None].path for w in (a, b)]
    files = all((folders[0] / n).read_bytes() == (folders[1] / n).read_bytes() for n in (WEIGHTS_FILE, META_FILE, "config.json"))
    if not all((f / STATE_FILE).is_file() for f in folders):  # dropped where no forget can start from it (a public model's)
        return files
    states = [load_file(str(f / STATE_FILE)) for f in folders]
    return files and states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_second_ward_with_the_same_base_spec_copies_it_from_the_cache(tmp_path, own_cache, trained_kinds):
    first = _ward(tmp_path / "a")
    first.train()
    assert trained_kinds == ["public-denoiser", "denoiser"]
    trained_kinds.clear()
    second = _ward(tmp_path / "b")
    second.train()
    assert trained_kinds == ["denoiser"]  # the base came from the cache
    assert _same_base(second, first)  # metadata included
    assert second.served("public-denoiser")[None].metadata == first.served("public-denoiser")[None].metadata
    assert second.served()[0].metadata["weights_sha256"] == first.served()[0].metadata["weights_sha256"]
    trained_kinds.clear()
    _ward(tmp_path / "c", seed=1).train()  # another seed is another base: a miss
    assert trained_kinds == ["public-denoiser", "denoiser"]
    assert len([p for p in own_cache.iterdir() if not p.name.startswith(".")]) == 2


def test_a_tampered_cache_entry_is_detected_retrained_and_replaced(tmp_path, own_cache, trained_kinds):
    first = _ward(tmp_path / "a")
    first.train()
    (entry,) = [p for p in own_cache.iterdir() if not p.name.startswith(".")]
    weights = entry / CHECKPOINT_DIR / WEIGHTS_FILE
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(str(weights)).items()}, str(weights))
    trained_kinds.clear()
    second = _ward(tmp_path / "b")
    with pytest.warns(UserWarning, match="corrupt.*differ"):
        second.train()
    assert trained_kinds == ["public-denoiser", "denoiser"]  # not used: trained again
    assert _same_base(second, first)
    assert checkpoint_hash(entry / CHECKPOINT_DIR) == first.served("public-denoiser")[None].metadata["weights_sha256"]  # replaced
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PublicModelCache().fetch(entry.name, tmp_path, "probe") is not None


def test_verify_checks_the_base_by_hash_unless_asked_to_retrain_it(tmp_path, own_cache, trained_kinds):
    ward = _ward(tmp_path / "w")
    ward.train()
    trained_kinds.clear()
    certificate = ward.verify()
    assert certificate.ok and trained_kinds == ["denoiser"]
    methods = {m.kind: m.method for m in certificate.models}
    assert methods == {"public-denoiser": "hash-checked", "denoiser": "retrained"}
    trained_kinds.clear()
    certificate = ward.verify(retrain_base=True)
    assert certificate.ok and trained_kinds == ["public-denoiser", "denoiser"]
    assert {m.kind: m.method for m in certificate.models} == {"public-denoiser": "retrained", "denoiser": "retrained"}
    base = ward.served("public-denoiser")[None]
    weights = ward.path / base.path / WEIGHTS_FILE
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(weights)).items()}, str(weights))
    check = next(m for m in ward.verify().models if m.kind == "public-denoiser")
    assert not check.equal and "changed or replaced" in check.reason


def test_the_announcement_lists_the_base_as_cached_after_a_miss_then_a_hit(tmp_path, own_cache):
    first = _ward(tmp_path / "a")
    plan = forecast_training(first.runner)
    assert [(m.kind, m.steps, m.cached) for m in plan.models] == [("public-denoiser", 3, False), ("denoiser", 4, None)]
    assert plan.describe().startswith("will train: public base (3 steps, cached: no); denoiser: 1 compartment(s) x 1 stage(s) (4 steps)")
    first.train()
    assert forecast_training(first.runner).describe() == "nothing to train: the ward is up to date"
    second = _ward(tmp_path / "b")
    plan = forecast_training(second.runner)
    assert [(m.kind, m.cached, m.seconds) for m in plan.models][0] == ("public-denoiser", True, 0.0)
    assert "public base (3 steps, cached: yes, copied)" in plan.describe()
    assert plan.to_dict()["models"][0] | {"seconds_per_step": None} == {"kind": "public-denoiser", "compartment": None, "stages": 1, "steps": 3,
                                                                         "cached": True, "seconds_per_step": None}


def test_cli_train_announces_the_base_and_whether_it_is_cached_then_verify_says_how_it_checked(tmp_path, own_cache):
    from test_cli import run

    for name in ("a", "b"):
        _ward(tmp_path / name).close()
    first = run("train", tmp_path / "a").stderr
    assert "will train: public base (3 steps, cached: no); denoiser: 1 compartment(s) x 1 stage(s) (4 steps)" in first
    assert "an estimate" in first
    second = run("train", tmp_path / "b").stderr
    assert "public base (3 steps, cached: yes, copied)" in second and "copied from the cache of public models" in second
    verify = run("verify", tmp_path / "b").stdout
    assert "recorded hash" in verify and "not retrained (--retrain-base retrains them too)" in verify
