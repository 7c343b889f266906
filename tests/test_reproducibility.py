"""Pinned bytes: a tiny ward trained under portable numerics has these exact weight and sample hashes on any AVX2 machine.

The fixture covers every model kind the ward trains (denoisers in two SISA stages, the router, guards, the public
denoiser, DP fine-tuning, the public autoencoder and latent models) and samples with each kind of weights. A change of
machine, of a dependency or of the code that moves any byte fails here; so does a refactoring that was meant to change
nothing. If a change is *meant* to move bytes, say so in its commit and re-pin with ``DATAWARD_PRINT_HASHES=1``.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from conftest import make_ward
from dataward import numerics
from dataward.config import AutoencoderConfig, DPConfig, GuardConfig, TrainConfig

pytestmark = pytest.mark.skipif(numerics.process_numerics() != "portable",
                                reason="pinned hashes hold under portable numerics only (an x86-64 CPU with AVX2, DATAWARD_NUMERICS unset)")

GUARD = GuardConfig(width=16, steps=4, batch_size=16)
PUBLIC = TrainConfig(steps=3, batch_size=30)

# first 16 hex digits of each served model's weights_sha256 and of each sample set's bytes
PINNED_PIXEL = {
    "denoiser/0/s0": "be2dd0f44df8572d", "denoiser/0/s1": "27386da18cb82c46", "denoiser/1/s0": "7189d1b694de98ca",  # 1: DP, one phase
    # guards and guarded samples re-pinned in issue 17: the calibration term on non-member images changed how guards train
    "guard/0/s0": "854fb65b970b5c2a", "guard/0/s1": "40e11c4d5fa2d2f7", "guard/1/s0": "7bfa76ee7ce4ddee", "guard/1/s1": "c1a4f591ab025fea",
    "public-denoiser/None/s0": "75e1ea6432839ba9", "router/None/s0": "59ca6cafbb207570", "router/None/s1": "378a5568ac6c5fb1",
    "sample/density": "704ce1a0bd9ac5a6", "sample/guarded": "ccb04fe6c70a15b4", "sample/router": "dcbadc43d3ac96ff",
}
PINNED_LATENT = {
    "autoencoder/None/s0": "b029b663faf83c58", "public-denoiser/None/s0": "facb324a0a8ec35a",
    "denoiser/0/s0": "fdc2e12488a6fd59", "denoiser/0/s1": "d3bcffab34ddd7f1", "denoiser/1/s0": "ffa6a80fa04d9498", "denoiser/1/s1": "900113a8661b063e",
    "sample/latent": "be69c27500638d36",
}


def _models(ward) -> dict[str, str]:
    return {f"{r.kind}/{r.compartment}/s{r.stage}": r.metadata["weights_sha256"][:16]
            for r in ward.ledger.models(status=None, any_compartment=True) if r.status == "ready"}


def _samples(ward, name: str, **options) -> dict[str, str]:
    result = ward.sample(4, seed=3, steps=5, **options)
    return {f"sample/{name}": hashlib.sha256(result.images.numpy().tobytes() + result.attribution.numpy().tobytes()).hexdigest()[:16]}


def _check(got: dict[str, str], pinned: dict[str, str]) -> None:
    if os.environ.get("DATAWARD_PRINT_HASHES"):
        print(json.dumps(got, indent=1, sort_keys=True))
    assert got == pinned


def test_pixel_ward_bytes_are_pinned(tmp_path):
    torch.set_num_threads(2)
    ward = make_ward(tmp_path / "w", guard=True, guard_settings=GUARD)
    ward.train()
    ward.pretrain("printed:count=60", PUBLIC)
    ward.enable_dp(DPConfig(epsilon=10.0, batch=20, epochs=1), compartments=[1])
    got = _models(ward)
    got |= _samples(ward, "density", weights="density", sampler="ddpm", allowed=[0])
    got |= _samples(ward, "router", weights="router", sampler="ddim")
    got |= _samples(ward, "guarded", weights="router", guard=True, guard_scale=5.0, guard_alpha=0.49)  # a 4-step guard is barely sure: steer wherever p > 0.51
    ward.close()
    _check(got, PINNED_PIXEL)


def test_latent_ward_bytes_are_pinned(tmp_path):
    torch.set_num_threads(2)
    ward = make_ward(tmp_path / "w", data="digits:subset=40", router=False)
    ward.pretrain("printed:count=60", PUBLIC, latent=True, autoencoder=AutoencoderConfig(steps=3, batch_size=30),
                  autoencoder_data="strokes:count=40")
    ward.train()
    got = _models(ward) | _samples(ward, "latent", weights="density", sampler="ddpm")
    ward.close()
    _check(got, PINNED_LATENT)


def test_every_model_records_the_numerics_it_was_trained_with(ward_copy):
    records = ward_copy.ledger.models(status=None, any_compartment=True)
    assert records and all(r.metadata["numerics"] == numerics.fingerprint() for r in records)
    assert ward_copy.config.numerics == "portable"


def test_verify_names_what_differs_between_machines():
    here = numerics.fingerprint()
    assert numerics.differences(here, here) == []
    avx512 = here | {"mode": "native", "cpu_capability": "AVX512", "dnnl_max_cpu_isa": "native", "mkl_cbwr": "native", "cpu": "Other CPU"}
    diff = numerics.differences(avx512, here)
    assert any(d.startswith("cpu_capability: trained with 'AVX512'") for d in diff) and any(d.startswith("cpu:") for d in diff)
    assert numerics.differences(here | {"cpu": "Other CPU"}, here) == []  # portable bytes do not depend on the exact CPU
    assert numerics.differences(None, here) == ["the model records no numerics (trained before dataward recorded them)"]


def test_a_portable_ward_refuses_to_train_with_native_kernels(tmp_path):
    import subprocess
    import sys

    make_ward(tmp_path / "w").close()
    script = f"from dataward.ward import Ward; Ward.open({str(tmp_path / 'w')!r}).train()"
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV} | {numerics.MODE_ENV: "native"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "portable numerics" in proc.stderr and "DATAWARD_NUMERICS=native is set" in proc.stderr
    assert not any((tmp_path / "w" / "models").iterdir())  # refused before anything was written


_WAIT_PROBE = """
import hashlib, json, os
import dataward  # chooses the wait policy unless the environment has one
import torch
from dataward.data import load_source
from dataward.diffusion.sampling import make_sampler, make_training_scheduler, sample_loop, unet_eps
from dataward.models.nets import build_unet
from dataward.config import TrainConfig
from dataward.training.loop import TrainState, denoiser_loss, run_steps
torch.set_num_threads(2)
config = TrainConfig(batch_size=32, threads=2)
scheduler = make_training_scheduler()
state = TrainState.fresh(build_unet("tiny", 8, 1, 10, seed=0), config)
run_steps(state, load_source("digits:subset=100"), denoiser_loss(scheduler), 3, config, torch.Generator().manual_seed(0))
x = sample_loop(unet_eps(state.model), torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
                make_sampler(scheduler, "ddim"), steps=5, y=torch.arange(8))
digest = hashlib.sha256(x.numpy().tobytes())
for p in state.model.parameters():
    digest.update(p.detach().numpy().tobytes())
print(json.dumps({"wait": [os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")], "hash": digest.hexdigest()}))
"""


def test_how_threads_wait_changes_no_bytes_and_the_users_choice_is_kept():
    import subprocess
    import sys

    from dataward import openmp

    base = {k: v for k, v in os.environ.items() if k not in openmp.USER_VARIABLES}
    runs = {}
    for name, extra in {"dataward's default": {}, "spin forever": {"OMP_WAIT_POLICY": "ACTIVE"}, "sleep at once": {"OMP_WAIT_POLICY": "PASSIVE"},
                        "spin 1000": {"GOMP_SPINCOUNT": "1000"}}.items():
        proc = subprocess.run([sys.executable, "-c", _WAIT_PROBE], capture_output=True, text=True, env=base | extra, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs["dataward's default"]["wait"] in ([None, None], ["PASSIVE", None])  # as the machine was at import
    assert runs["spin forever"]["wait"] == ["ACTIVE", None]  # the user's setting is kept as it is
    assert runs["sleep at once"]["wait"] == ["PASSIVE", None]
    assert runs["spin 1000"]["wait"] == [None, "1000"]  # GOMP_SPINCOUNT alone also counts as the user's choice
    assert len({run["hash"] for run in runs.values()}) == 1, runs


def test_threads_sleep_at_once_only_where_other_work_keeps_the_cores_busy(monkeypatch):
    from dataward import openmp

    assert openmp.choose(0, 2) == openmp.choose(1, 2) == {}  # libgomp's default: the fastest setting measured alone
    assert openmp.choose(2, 2) == openmp.choose(9, 2) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp.choose(None, 2) == {} and openmp.choose(3, 4) == {}
    for name in openmp.USER_VARIABLES:  # set, then delete: monkeypatch restores each as it was (set or not) afterwards
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)
    monkeypatch.setattr(openmp, "other_running_threads", lambda cores: 0)
    openmp.select_from_environment()
    assert not any(name in os.environ for name in openmp.USER_VARIABLES)
    monkeypatch.setattr(openmp, "other_running_threads", lambda cores: 5)
    openmp.select_from_environment()
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ
    monkeypatch.setattr(openmp, "other_running_threads", lambda cores: 0)
    openmp.select_from_environment()  # the first choice now counts as the user's: a child process keeps its parent's
    assert os.environ.get("OMP_WAIT_POLICY") == "PASSIVE"


def test_a_busy_machine_is_confirmed_by_several_reads_and_a_free_one_costs_one(monkeypatch):
    from dataward import openmp

    reads = iter([3, 0, 4, 5, 0])  # a busy first read is confirmed by the median of five: 3
    monkeypatch.setattr(openmp, "other_threads_now", lambda: next(reads))
    assert openmp.other_running_threads(2, interval_s=0) == 3
    reads = iter([3, 0, 0, 1, 5])  # a momentary spike is not a busy machine
    assert openmp.other_running_threads(2, interval_s=0) == 1
    reads = iter([1])  # a free first read is the answer: one read, no wait
    assert openmp.other_running_threads(2, interval_s=0) == 1
