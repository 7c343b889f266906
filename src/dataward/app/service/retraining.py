"""Retraining in the background after forgets: one thread, one training at a time, and a ward that never registers a
model trained on an ID forgotten while it trained."""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path

import torch

from dataward.errors import DataChanged, LedgerUnavailable
from dataward.store.checkpoints import MODELS_DIR
from dataward.store.lock import WriterBusy
from dataward.training.planner import TrainJob
from dataward.ward import Ward, WardHooks

log = logging.getLogger("dataward.app.service")
WRITER_BUSY_RETRY_SECONDS = 5.0  # how often the retraining thread looks again while another process trains the ward (or the ledger is down)
FAILURE_BACKOFF_SECONDS = (1.0, 300.0)  # after a failed training: the first retry's delay, doubling up to the second


class StaleTraining(DataChanged):
    """A training finished on IDs that were forgotten meanwhile; its models were not registered (``Ward.train`` plans
    again with the live IDs)."""


class RefuseForgotten:
    """``WardHooks.before_register`` of the retraining ward: refuse (and delete) a job's checkpoints when one of their
    IDs was forgotten while it trained, so the next run trains again on the data as it is now.

    A forget that commits after this check is still safe: the ledger registers a model that saw a forgotten ID as
    quarantined, in the same transaction (:meth:`Ledger.register_model`), so it is never served.
    """

    def __init__(self) -> None:
        self.ward: Ward | None = None  # the ward this hook belongs to (set by :func:`open_retraining_ward`)

    def __call__(self, job: TrainJob, results: list[dict]) -> None:
        ids = sorted({i for r in results for i in r["ids"]})
        rows = self.ward.ledger.sample_rows(ids)
        if any(i not in rows or rows[i][2] is not None for i in ids):
            for r in results:
                shutil.rmtree(self.ward.path / MODELS_DIR / r["folder"], ignore_errors=True)
            raise StaleTraining("IDs were forgotten while training; retraining")


def open_retraining_ward(path: Path, worker: bool = False) -> Ward:
    """A ward that trains and refuses stale results (see :class:`RefuseForgotten`). The service opens its one
    retraining ward with ``worker=False``: that open cleans up after a crash."""
    refuse = RefuseForgotten()
    ward = Ward.open(path, worker=worker, hooks=WardHooks(before_register=refuse))
    refuse.ward = ward
    return ward


class Retrainer:
    """One thread that runs ``ward.train()`` whenever asked (after a forget), one training at a time. A training that
    fails is retried after ``backoff`` seconds, doubling up to a cap; ``last_error`` and ``retry_in_seconds`` say so."""

    def __init__(self, ward: Ward, torch_threads: int, backoff: tuple[float, float] = FAILURE_BACKOFF_SECONDS):
        self.ward = ward
        self.torch_threads = torch_threads
        self.backoff = backoff
        self.running = False
        self.last_error: str | None = None  # why the last training failed (None once one succeeded)
        self.retry_in_seconds: float | None = None  # the wait after the last attempt before the next (None: none is due)
        self._wanted = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dataward-retrain", daemon=True)

    def start(self) -> None:
        """Start the thread (and retrain at once if a forget from an earlier run is still pending)."""
        self._thread.start()
        if self.ward.ledger.pending_forgets():
            self.request()

    def request(self) -> None:
        """Ask for a training run (coalesced with one already asked for)."""
        self._wanted.set()

    def stop(self, timeout: float) -> bool:
        """Stop after the current training; True when the thread ended within ``timeout`` (then its ward is closed)."""
        self._stop.set()
        self._wanted.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self.ward.close()
        return True

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._wanted.wait()
            if self._stop.is_set():
                return
            self._wanted.clear()
            delay = None
            try:
                self.running = True
                self.ward.train(progress=False)  # a server thread: no progress display
                self.last_error, failures = None, 0
                if self.ward.ledger.pending_forgets() and self.ward.models_missing():
                    delay = 1.0  # forgets kept landing during the run: go again
            except WriterBusy as busy:  # another process (e.g. `dataward train`) is training: it retrains this too; look again later
                log.info("retraining waits: %s", busy)
                delay = WRITER_BUSY_RETRY_SECONDS
            except LedgerUnavailable as error:  # the ledger database is down: the forget stays pending there; look again later
                log.warning("retraining waits for the ledger: %s", error)
                self.last_error, delay = str(error), WRITER_BUSY_RETRY_SECONDS
            except Exception as error:  # noqa: BLE001 - keep serving; the ledger keeps the forget pending
                log.exception("retraining failed")
                failures += 1
                self.last_error = f"{type(error).__name__}: {error}"
                delay = min(self.backoff[1], self.backoff[0] * 2 ** (failures - 1))  # an error that stays must not spin
            finally:
                self.running = False
                torch.set_num_threads(self.torch_threads)  # training sets its own thread count
            self.retry_in_seconds = delay
            if delay is not None:
                self._wanted.set()
                self._stop.wait(delay)
