"""What changes what a ward trains: public pretraining (the base), DP fine-tuning, guards, new data, forgetting; ward.json.

:class:`WardChanges` is mixed into :class:`dataward.ward.Ward`. Each change takes the ward's writer lock first (while
another process writes it raises :class:`~dataward.store.lock.WriterBusy` and nothing changed), is validated before
anything is written, saved in ward.json, then (by default) trained under the same lock. ward.json is the one source of
truth of the config: every process re-reads it when another one saved it (:meth:`WardChanges.refresh_config`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace

from dataward.assignment import check_new_data, insert_samples
from dataward.config import AutoencoderConfig, DPConfig, GuardConfig, TrainConfig, WardConfig
from dataward.data import Dataset, load_source
from dataward.errors import DatawardError
from dataward.sampling.export import export_states
from dataward.forgetting import ForgetResult, split_forget_ids
from dataward.models.nets import build_autoencoder
from dataward.store.checkpoints import delete_quarantined
from dataward.store.lock import WriterBusy
from dataward.training.kinds import PUBLIC_KINDS
from dataward.training.privacy import check_dp_change, plan_dp


@dataclass(frozen=True)
class TrainResult:
    """What one :meth:`dataward.ward.Ward.train` did (also what ``pretrain``, ``enable_dp`` and ``enable_guards`` return
    when they train). Defined here, beside the changes that return it: :mod:`dataward.ward` imports this module."""

    seconds: float  # wall-clock time of the call
    finished_forgets: list[str]  # forget requests this training finished (their retraining done: state ``done``)


@dataclass(frozen=True)
class AddResult:
    """What :meth:`WardChanges.add` did: the new compartment(s) and, when it trained, that training."""

    compartments: list[int]  # the new compartments' IDs
    samples: int  # how many samples they hold
    training: TrainResult | None  # the training that followed (None with ``train=False``)


class WardChanges:
    """The methods of :class:`dataward.ward.Ward` that change what it trains (they use its config, ledger and train)."""

    def refresh_config(self) -> None:
        """Re-read ward.json if another process saved it since this one read it: a running server follows `dataward
        train --steps` and the other changes (the ``config`` and ``planner`` of the ward call this at each use)."""
        stamp = WardConfig.stamp(self.path)
        if stamp is not None and stamp != self.config_stamp:
            self.config_stamp = stamp
            self.config = WardConfig.load(self.path)

    def reconfigure(self, **changes) -> None:
        """Change fields of the ward's config (``dataclasses.replace``) and save ward.json, holding the writer lock."""
        with self.writer:
            self.config = replace(self.config, **changes)
            self.save_config()

    def save_config(self) -> None:
        """Save the config (as changed in this process, under the writer lock it holds since it read it) as ward.json."""
        with self.writer:
            self._config.save(self.path)
            self.config_stamp = WardConfig.stamp(self.path)

    def pretrain(self, public: str, train: TrainConfig | None = None, device: str = "cpu", progress=True, latent: bool = False,
                 autoencoder: AutoencoderConfig | None = None, autoencoder_data: str | None = None, as_base: bool = False) -> TrainResult:
        """Pretrain the public models on public data (``dataward pretrain``): the denoiser that DP fine-tuning starts from,
        in pixel space or (``latent``) in the latent space of a public autoencoder trained first on ``autoencoder_data``
        (DP-LDM). In a ward with a public base, or with ``as_base``, it is the base every compartment fine-tunes from.
        A new base, or switching between pixel and latent space, makes every compartment model out of date: ``train``
        retrains them."""
        if not latent and (autoencoder is not None or autoencoder_data is not None):
            raise DatawardError("the autoencoder's settings (--autoencoder-steps / autoencoder, --autoencoder-data / autoencoder_data) "
                                "need --latent (latent=True): pixel wards have no autoencoder")
        with self.writer:  # nothing changes while another process writes (it raises WriterBusy first)
            if self.config.base == "imported" and not as_base:
                raise DatawardError("this ward's base is an imported UNet: pretrain --as-base replaces it with one trained on public data")
            autoencoder = replace(autoencoder or self.config.autoencoder, image_size=self.config.image_size, channels=self.config.channels)
            self.config = replace(self.config, public=public, public_train=train or self.config.public_train, latent=latent,
                                  autoencoder=autoencoder, autoencoder_data=autoencoder_data or self.config.autoencoder_data,
                                  base="public" if as_base or self.config.base is not None else None)
            self.data.public_data()  # fails early on bad public data
            if latent:
                build_autoencoder(autoencoder, 0)  # fails early on an image size the autoencoder cannot take
                try:
                    self._denoiser_probe()  # ... or a latent size the denoiser preset cannot take
                except DatawardError as error:
                    shape = "x".join(map(str, self.model_shape()))
                    raise DatawardError(f"the {shape} latents are too small for the {self.config.model!r} preset ({error}): "
                                        f"use a smaller preset or larger images") from None
                self.data.autoencoder_data()
            self.save_config()
            return self.train(device=device, progress=progress, only=PUBLIC_KINDS)

    def enable_dp(self, dp: DPConfig, compartments: list[int] | None = None, train: bool = True, device: str = "cpu", progress=True,
                  replace_dp: bool = False) -> TrainResult | None:
        """Train the compartments' denoisers with DP-SGD (``dataward train --dp``): validated before anything is written.
        A ward has one DP setting: replacing a different one needs ``replace_dp``. In a ward with LoRA adapters DP trains
        the adapters (``trainable="lora"``; :func:`dataward.training.privacy.default_trainable` names a ward's default).
        Returns the training, or None with ``train=False``."""
        with self.writer:  # nothing changes while another process writes (it raises WriterBusy first)
            check_dp_change(self.config, dp, compartments, replace_dp)
            known = self.compartments()
            chosen = known if compartments is None else sorted(set(compartments))
            unknown = [c for c in chosen if c not in known]
            if unknown:
                raise DatawardError(f"unknown compartment(s) {unknown}: this ward has {known}")
            if (dp.trainable == "lora") != (self.config.lora_rank() is not None):
                raise DatawardError("DP fine-tuning of a ward with LoRA adapters trains the adapters: use trainable lora there, and only there "
                                    f"(this ward's adapter: {self.config.adapter})")
            probe = self._denoiser_probe()
            for c in chosen:
                plan_dp(dp, self.ledger.counts()[c]["samples"], probe)  # ε, δ, clip, budget, layers: errors before training
            self.reconfigure(dp=dp, dp_compartments=None if compartments is None else tuple(chosen))
            return self.train(device=device, progress=progress) if train else None

    def enable_guards(self, settings: GuardConfig | None = None, train: bool = True, device: str = "cpu", progress=True) -> TrainResult | None:
        """Turn on CPSample guards for every compartment (``dataward guard``) and train them (None with ``train=False``)."""
        with self.writer:  # nothing changes while another process writes (it raises WriterBusy first)
            self.reconfigure(guard=True, guard_settings=settings or self.config.guard_settings)
            return self.train(device=device, progress=progress) if train else None

    def add(self, data: str | Dataset, train: bool = True, device: str = "cpu", progress=True) -> AddResult:
        """Add new data as new compartment(s) (continual learning); existing compartments' models are untouched."""
        with self.writer:  # nothing changes while another process writes (it raises WriterBusy first)
            dataset = load_source(data) if isinstance(data, str) else data
            spec = data if isinstance(data, str) else "dataset"
            check_new_data(self.config, dataset)
            new = insert_samples(self.ledger, self.config, dataset.resized(self.config.image_size, self.config.channels), spec, new_compartments=1)
            return AddResult(new, len(dataset), self.train(device=device, progress=progress) if train else None)

    def accept_forget(self, ids: list[str]) -> ForgetResult:
        """Forget IDs, step 1: in effect at once (one ledger transaction: every model that saw them quarantined, its files
        deleted). Needs no lock and never waits on erasure, which a reader of an old snapshot may delay (:class:`Eraser`)."""
        new, already = split_forget_ids(self.ledger, ids)
        if not new:
            return ForgetResult(new, already, None, "noop", message=f"all {len(already)} ID(s) were already forgotten")
        request = uuid.uuid4().hex[:12]
        quarantined = self.ledger.accept_forget(request, new)
        erased = self.eraser.erase(request)
        delete_quarantined(self.path, self.ledger, self.cache)
        return ForgetResult(new, already, request, "accepted", quarantined_models=len(quarantined), serving_during_retraining=self.serving_state(),
                            erased=erased, stale_exports=tuple(e["folder"] for e in export_states(self.ledger) if e["stale"]))

    def finish_forget(self, accepted: ForgetResult, device: str = "cpu", progress=True) -> ForgetResult:
        """Forget, step 2: retrain what is missing under the writer lock (this finishes every pending forget); while
        another process holds the lock, that process retrains this too (``retraining_elsewhere``)."""
        if accepted.request is None:
            return accepted
        try:
            done = {"retrain_seconds": self.train(device=device, progress=progress).seconds}
        except WriterBusy as busy:  # the forget is in effect regardless
            done = {"retraining_elsewhere": str(busy)}
        record = self.ledger.forget_request(accepted.request)
        return replace(accepted, state=record["state"], erased=record["erased"], **done)

    def forget(self, ids: list[str], device: str = "cpu", progress=True) -> ForgetResult:
        """Forget sample IDs: :meth:`accept_forget`, then :meth:`finish_forget`."""
        return self.finish_forget(self.accept_forget(ids), device, progress)
