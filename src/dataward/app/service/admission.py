"""What a generation request costs, and how long it will take on this server, learned from the generations that finished.

A request's work is ``n`` images over ``steps x models`` denoiser calls (models evaluated per step: 1 for soup, ``top_k``
or the key's compartments otherwise; x2 with the guard, whose gradient costs about a second call). One call on a batch of
``n`` images takes about ``a + b n`` seconds (a fixed cost per call plus a cost per image), so a generation takes
``steps x models x (a + b n)``. :class:`RunTimes` fits ``a`` and ``b`` by least squares over the last runs; the pool
uses the estimate to refuse (429) a request that would wait longer than the timeout, and to say how long in Retry-After.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from dataward.app.service.api import ApiKey, GenerateRequest


@dataclass(frozen=True)
class Work:
    """A generation's cost: ``n`` images through ``calls`` denoiser calls."""

    n: int
    calls: int


def request_work(body: GenerateRequest, key: ApiKey, weights: str) -> Work:
    """The work of a generation request over the key's compartments with these weights."""
    models = 1 if weights == "soup" else min(len(key.allow), body.top_k or len(key.allow))
    return Work(body.n, body.steps * models * (2 if body.guard else 1))


class RunTimes:
    """Seconds per denoiser call as ``a + b n``, fitted over the last ``window`` finished generations."""

    def __init__(self, window: int = 64):
        self.runs: deque[tuple[int, float]] = deque(maxlen=window)  # (n, seconds per call)

    def add(self, work: Work, seconds: float) -> None:
        """Learn from a generation that finished."""
        self.runs.append((work.n, seconds / work.calls))

    def estimate(self, work: Work) -> float | None:
        """Seconds ``work`` will take (None before any generation finished). With one batch size seen so far, the cost per
        call is taken as proportional to ``n`` above it and constant below it (an overestimate either way)."""
        if not self.runs:
            return None
        n, per_call = np.array(self.runs, dtype=float).T
        if np.unique(n).size >= 2:
            a, b = np.linalg.lstsq(np.stack([np.ones_like(n), n], axis=1), per_call, rcond=None)[0]
            if a >= 0 and b >= 0:
                return work.calls * (a + b * work.n)
        seen = float(np.median(n))
        return work.calls * float(np.median(per_call)) * max(1.0, work.n / seen)
