"""OpenMP waiting: how torch's intra-op threads wait for work, chosen so that a shared machine is shared fairly.

torch runs its CPU kernels on libgomp's threads. Between parallel regions a thread with no work spins (300,000 times by
libgomp's default) before it sleeps. On an idle machine that saves a wake-up; on a machine where anything else is busy
the spinning thread burns the core that the thread it waits for needs, and every region waits for a time slice: a
training step of the demo took 25x longer beside two busy processes (BENCHMARKS.md "Threading defaults").

dataward therefore sets ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once), chosen from the measurements there: it is
the fastest setting measured under load and costs nothing measurable on an idle machine. Waiting changes no arithmetic:
the same seed and thread count give the same bytes under every wait setting (pinned by a test).

libgomp reads its settings once, when torch is imported, so :func:`select_from_environment` runs when ``dataward`` is
imported: import dataward before torch (the numerics pinning asks the same). The user's own environment wins: if
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set, nothing is changed. Every process dataward starts (service workers,
Ray workers, ``spawn``-ed children) inherits the setting through the environment.
"""

from __future__ import annotations

import os

USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # either one set by the user keeps libgomp as the user wants it
DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def select_from_environment() -> None:
    """Set dataward's wait policy unless the user chose one (it has no effect in a process that imported torch already)."""
    if any(name in os.environ for name in USER_VARIABLES):
        return
    os.environ.update(DEFAULTS)

