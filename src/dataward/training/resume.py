"""In-stage checkpoints: a stage's training saved between two steps, so an interrupted stage continues where it stopped,
to the bytes an uninterrupted run gives.

One file per stage in training, ``WARD/resume/<kind>-c<compartment|all>-s<stage>.safetensors`` (a temp file, then a
rename): the :class:`~dataward.training.loop.TrainState` (raw weights, EMA, Adam, step), the stage's
:class:`~dataward.training.loop.StageCursor` (steps done, the rows left of the current shuffle, the generator's state)
and the stage's *spec*: a hash of everything that decides the stage's bytes (kind, compartment, stage, the IDs hash of
it and of every earlier stage, variant, budget, steps, seed, numerics, dataward version). A file of another spec is
never used. The runner writes one every :data:`CHECKPOINT_SECONDS` of a stage's training (a few tens of milliseconds for
the tiny preset's 11 MB, so well under 0.1% of the time) and when a signal stops it (:mod:`dataward.interrupts`), and
removes it once the stage's checkpoint folder is written; :func:`sweep` removes those no current stage can use (after
a forget: a file that saw a forgotten ID). A DP stage's file also holds its Poisson sampling and noise generators' states
and its accountant's history (:meth:`dataward.training.dp.PrivateTraining.cursor`), so it resumes to the same bytes and
the same ε; one with ``secure_rng`` (whose randomness cannot be saved) keeps none and restarts from its first step.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

import dataward
from dataward.data import ids_hash
from dataward.interrupts import DeferredSignals
from dataward.store.checkpoints import folder_prefix
from dataward.training.loop import StageCursor, TrainState
from dataward.training.planner import Lineage

CHECKPOINT_SECONDS = 60.0  # seconds of a stage's training between two in-stage checkpoints
SUFFIX = ".safetensors"


def stage_spec(lineage: Lineage, stage: int, seed: int, numerics: str) -> str:
    """A hash of everything that decides a stage's bytes: an in-stage checkpoint is used only by a stage of the same spec."""
    basis = {"kind": lineage.kind, "compartment": lineage.compartment, "stage": stage, "ids": [ids_hash(ids) for ids in lineage.stage_ids[: stage + 1]],
             "variant": lineage.variant, "train": asdict(lineage.config), "steps": lineage.stage_steps(stage), "seed": seed, "numerics": numerics,
             "version": dataward.__version__}
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()


def stage_name(lineage: Lineage, stage: int) -> str:
    """The name of a stage's in-progress files: ``NAME.safetensors`` (its in-stage checkpoint), ``NAME.csv`` (its loss log)."""
    return f"{folder_prefix(lineage.kind, lineage.compartment)}{stage}"


def _spec_of(path: Path) -> str | None:
    """The spec a checkpoint file was saved for (None: unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("spec")
    except (OSError, SafetensorError):
        return None


class StageCheckpoint:
    """The in-stage checkpoint of one stage: where it is, whose it is (``spec``), and when it was last saved."""

    def __init__(self, folder: Path, lineage: Lineage, stage: int, spec: str):
        self.path = folder / f"{stage_name(lineage, stage)}{SUFFIX}"
        self.spec = spec
        self.saved_at = time.monotonic()
        self.saved_step: int | None = None  # the stage's steps done at the last save (or load)

    def load(self, state: TrainState) -> StageCursor | None:
        """Restore ``state`` from this stage's checkpoint and return its cursor; None (and the file removed) when there is
        none or it belongs to another spec."""
        if not self.path.is_file():
            return None
        if _spec_of(self.path) != self.spec:
            self.remove()
            return None
        tensors = load_file(str(self.path))
        with safe_open(str(self.path), framework="pt") as handle:
            meta = handle.metadata()
        state.restore({k[6:]: v for k, v in tensors.items() if k.startswith("state.")}, meta, self.path)
        self.saved_step = int(meta["done"])
        streams = {k[len("cursor.stream."):]: v for k, v in tensors.items() if k.startswith("cursor.stream.")}
        return StageCursor(self.saved_step, tensors["cursor.rows_left"], tensors["cursor.generator_state"], streams, meta.get("accountant"))

    def steps_done(self) -> int:
        """The stage's steps done at this checkpoint (0 when there is none of this spec), read without loading it."""
        if not self.path.is_file() or _spec_of(self.path) != self.spec:
            return 0
        with safe_open(str(self.path), framework="pt") as handle:
            return int((handle.metadata() or {}).get("done", 0))

    def save(self, state: TrainState, cursor: StageCursor) -> None:
        """Write the state and the cursor atomically (a temp file, then a rename)."""
        tensors, meta = state.tensors()
        tensors = {f"state.{k}": v for k, v in tensors.items()} | {"cursor.rows_left": cursor.rows_left.contiguous(),
                                                                   "cursor.generator_state": cursor.generator_state.contiguous()}
        tensors |= {f"cursor.stream.{name}": value.contiguous() for name, value in cursor.streams.items()}
        meta = meta | {"spec": self.spec, "done": str(cursor.done)} | ({} if cursor.accountant is None else {"accountant": cursor.accountant})
        self.path.parent.mkdir(exist_ok=True)
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.path)
        self.saved_at, self.saved_step = time.monotonic(), cursor.done

    def due(self) -> bool:
        """Whether :data:`CHECKPOINT_SECONDS` passed since the last save (or the stage's start)."""
        return time.monotonic() - self.saved_at >= CHECKPOINT_SECONDS

    def remove(self) -> None:
        """Remove the file (the stage is done, or the file is of no use)."""
        self.path.unlink(missing_ok=True)


class CheckpointedSteps:
    """What happens after each step of a stage: its in-stage checkpoint is saved when due, at the stage's last step and
    when a signal arrived; then a pending signal is delivered, with a note saying where the stage stands."""

    def __init__(self, checkpoint: StageCheckpoint, signals: DeferredSignals, steps: int, where: str):
        self.checkpoint, self.signals, self.steps, self.where = checkpoint, signals, steps, where

    def load(self, state: TrainState) -> StageCursor | None:
        """The stage's checkpoint restored into ``state`` (see :meth:`StageCheckpoint.load`)."""
        return self.checkpoint.load(state)

    def after_step(self, state: TrainState, cursor: Callable[[], StageCursor], done: int, before_stop: Callable[[], None] = lambda: None) -> None:
        """After the stage's ``done``-th step: save ``cursor()`` with ``state`` if due; on a pending signal, call
        ``before_stop`` (close the loss log) and deliver it."""
        if self.signals.pending is not None or self.checkpoint.due() or done == self.steps:
            self.checkpoint.save(state, cursor())
        if self.signals.pending is not None:
            before_stop()
            try:
                self.signals.deliver()
            except BaseException as stop:  # the signal's own exception (KeyboardInterrupt, Interrupted), noted
                stop.add_note(f"{self.where} is checkpointed at step {done} of {self.steps}")
                raise


def sweep(folder: Path, wanted: dict[str, str]) -> None:
    """Remove the in-progress files under ``folder`` that no current stage can use: ``wanted`` maps the
    :func:`stage_name` of each stage still to train to its spec. A checkpoint of another spec, a loss log of no such
    stage and a temp file a crash left all go."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        stem, _, suffix = path.name.rpartition(".")
        keep = stem in wanted and (suffix == "csv" or (f".{suffix}" == SUFFIX and _spec_of(path) == wanted[stem]))
        if not keep:
            path.unlink(missing_ok=True)
