"""OpenMP waiting: how torch's intra-op threads wait for work, chosen so that a shared machine is shared fairly.

torch runs its CPU kernels on libgomp's threads. Between parallel regions a thread with no work spins before it sleeps:
300,000 times by libgomp's default. On a machine where other work is running, the spinning threads burn the cores that
the threads they wait for need, and every parallel region waits for a time slice: beside two other torch jobs a
training run of the demo's model took 16x longer than alone.

What was measured on 2 cores (``benchmarks/threading_defaults.py``, BENCHMARKS.md "Threading defaults"):

- ``OMP_WAIT_POLICY=PASSIVE`` (sleep at once) is the only setting that holds up beside other torch jobs (which spin
  themselves): 4x the time alone instead of 12-16x. But alone it is 1.6-1.9x slower than the default: every parallel
  region pays a wake-up.
- Alone, nothing tried beat libgomp's default: ``GOMP_SPINCOUNT=30000`` was within noise of it on training steps but
  made ``dataward demo --quick`` 6% slower (sampling 21%).

So dataward looks at the machine once, when torch has not loaded yet: if other processes' runnable threads already
fill every core this process may use (``procs_running`` in ``/proc/stat``; a busy first read is confirmed by the median of a few), threads sleep at
once (``PASSIVE``); otherwise libgomp's default is left as it is. Waiting changes no arithmetic: the same seed and
thread count give the same bytes under every wait setting (pinned by a test).

:func:`select_from_environment` runs when ``dataward`` is imported: import dataward before torch (the numerics pinning
asks the same). The user's own environment wins: if ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` is set, nothing is
changed. A process that chose ``PASSIVE`` passes it on to the processes it starts (service workers, Ray workers,
``spawn``-ed children) through the environment; on a free machine each of them looks for itself. Only libgomp
(torch's OpenMP on Linux) reads these; LLVM's OpenMP (macOS) has its own ``KMP_BLOCKTIME``, which dataward leaves
alone (not measured).
"""

from __future__ import annotations

import os
import statistics
import time

USER_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # either one set by the user keeps libgomp as the user wants it
ON_A_BUSY_MACHINE = {"OMP_WAIT_POLICY": "PASSIVE"}


def other_threads_now() -> int | None:
    """Threads of other processes runnable at this instant (``procs_running`` in ``/proc/stat``, less this process);
    None where unknown."""
    try:
        with open("/proc/stat") as stat:
            counts = [int(line.split()[1]) - 1 for line in stat if line.startswith("procs_running ")]
    except (OSError, ValueError, IndexError):
        return None
    return counts[0] if counts else None


def other_running_threads(cores: int, reads: int = 5, interval_s: float = 0.005) -> int | None:
    """Threads of other processes runnable now. A first read below ``cores`` is the answer (a free machine pays one read
    and no wait at import); a busy one is confirmed by the median of ``reads`` reads ``interval_s`` apart."""
    first = other_threads_now()
    if first is None or first < cores:
        return first
    counts = [first]
    for _ in range(reads - 1):
        time.sleep(interval_s)
        now = other_threads_now()
        if now is None:
            return None
        counts.append(now)
    return int(statistics.median(counts))


def choose(others: int | None, cores: int) -> dict[str, str]:
    """The variables to set for a process that may use ``cores`` cores while ``others`` threads of other processes run
    (none: libgomp's default)."""
    return ON_A_BUSY_MACHINE if others is not None and others >= cores else {}


def select_from_environment() -> None:
    """Set dataward's wait setting unless the user chose one (it has no effect in a process that imported torch already)."""
    if any(name in os.environ for name in USER_VARIABLES):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.update(choose(other_running_threads(cores), cores))
