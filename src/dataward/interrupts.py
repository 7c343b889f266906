"""Stopping long work cleanly on SIGINT (Ctrl-C) and SIGTERM.

The command line turns both signals into :class:`Interrupted` (:func:`raise_interrupted`; it exits 130 or 143 with one
line saying what was kept). Training defers them to the end of the current optimizer step (:class:`DeferredSignals`),
where the stage's state is whole and is saved (an in-stage checkpoint, :mod:`dataward.training.resume`) before the
signal takes its course: the handler that was there before runs (``KeyboardInterrupt`` in plain Python,
:class:`Interrupted` in the CLI, the default action for an unhandled SIGTERM). A second signal acts at once.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped the work. Like ``KeyboardInterrupt`` it is not an ``Exception``, so no ``except
    Exception`` swallows it. Notes (``add_note``) say what the interrupted work kept; ``ward`` is the ward it trained."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.ward: str | None = None

    @property
    def exit_code(self) -> int:
        """The shell's code for a process stopped by this signal: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


def raise_interrupted(signum: int, frame) -> None:
    """A signal handler: raise :class:`Interrupted` (the command line's handler of SIGINT and SIGTERM)."""
    raise Interrupted(signum)


class DeferredSignals:
    """While the block runs in the main thread, SIGINT and SIGTERM are recorded (``pending``) instead of acted on; the
    loop calls :meth:`deliver` where it can stop. A second signal, or the end of the block, delivers a recorded one.
    Elsewhere than in the main thread (a service's training thread) and for ignored signals it changes nothing."""

    def __init__(self):
        self.pending: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "DeferredSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                handler = signal.getsignal(signum)
                if handler not in (signal.SIG_IGN, None):
                    self.previous[signum] = handler
                    signal.signal(signum, self._record)
        return self

    def _record(self, signum: int, frame) -> None:
        if self.pending is not None:  # asked twice: stop now
            self.deliver()
        self.pending = signum

    def deliver(self) -> None:
        """Put the previous handlers back and act on the recorded signal (if any) as they would have."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
        pending, self.pending = self.pending, None
        if pending is not None:
            signal.raise_signal(pending)

    def __exit__(self, *exc) -> None:
        self.deliver()
