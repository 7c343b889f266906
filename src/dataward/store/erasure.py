"""Physical erasure after a forget, in the background: it never delays a forget's acknowledgement nor the next forget.

A forget takes effect in one ledger transaction (:meth:`dataward.store.ledger.Ledger.accept_forget`); making it physical
(SQLite: the truncating checkpoint that leaves no old page in ``ledger.sqlite`` or its write-ahead log) cannot happen
while another connection reads an older snapshot (a backup tool, an analyst's ``sqlite3`` shell, a long report). The
forget is answered first; an :class:`Eraser` then tries again, without waiting on the reader, until it succeeds, and
the ledger says which forgets are not yet erased (:meth:`~dataward.store.ledger.Ledger.unerased_forgets`).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from dataward.store.ledger import Ledger

log = logging.getLogger("dataward.store")
FIRST_RETRY_S = 0.05  # the first retry comes this soon after a failed attempt ...
MAX_RETRY_S = 1.0  # ... and the delay doubles up to this: erasure follows within about a second of the reader letting go


class Eraser:
    """Physical erasure for one ward's ``ledger``: :meth:`erase` tries once; while a reader prevents it, one thread (with
    its own connection to the ledger) retries until nothing is left to erase, then sleeps until the next request."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.location: Path | str = ledger.db.where
        self._lock = threading.Lock()
        self._wanted = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def erase(self, request: str | None = None) -> bool:
        """Erase what the ledger says is not yet erased: now if no reader prevents it (True), else in the background
        (False; for a new forget ``request``, an ``erasure-delayed`` event records it)."""
        if self.ledger.erase_forgotten():
            return True
        if request is not None:
            self.ledger.record_event("erasure-delayed", request=request, reason="another connection reads an older snapshot of the ledger")
        self.request()
        return False

    def request(self) -> None:
        """Erase what the ledger says is not yet erased, in the background, as soon as no reader prevents it."""
        with self._lock:
            self._idle.clear()
            self._wanted.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="dataward-erasure", daemon=True)
                self._thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every requested erasure is done; False if it is still pending after ``timeout`` seconds."""
        return self._idle.wait(timeout)

    def close(self) -> None:
        """Stop the thread (a pending erasure is left to the next process that opens the ward)."""
        self._stop.set()
        self._wanted.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        ledger, delay = None, FIRST_RETRY_S
        try:
            while not self._stop.is_set():
                self._wanted.wait()
                self._wanted.clear()
                if self._stop.is_set():
                    return
                try:
                    ledger = ledger or Ledger(self.location)
                    done = ledger.erase_forgotten()
                except Exception as error:  # noqa: BLE001 - the ledger is unreachable now: keep trying
                    log.warning("erasure after a forget waits: %s", error)
                    done = False
                with self._lock:
                    if done and not self._wanted.is_set():
                        self._idle.set()
                if done:
                    delay = FIRST_RETRY_S
                else:
                    self._wanted.set()
                    self._stop.wait(delay)
                    delay = min(2 * delay, MAX_RETRY_S)
        finally:
            if ledger is not None:
                ledger.close()
