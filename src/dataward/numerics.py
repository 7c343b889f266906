"""Numerics: which CPU kernels compute a ward's bytes, so that exact forgetting holds on any machine of a kind.

torch picks its CPU kernels by the instruction set of the machine it runs on: ATen's vectorised kernels (AVX-512, AVX2
or scalar), oneDNN's convolutions and MKL's matrix products each dispatch on it, and each choice sums in its own order.
The same code, seeds and thread count therefore give other bytes on a CPU with another instruction set (measured on
one machine by capping the instruction set: every denoiser hash changed; BENCHMARKS.md "Reproducibility").

*Portable* numerics (the default) pins all three to AVX2, which every x86-64 server of the last decade has: a ward trained
on one such machine is reproduced bit for bit on another. *Native* numerics lets each library use the best instruction
set of the machine (faster where AVX-512 pays off; bytes reproducible on the same kind of CPU only).

The libraries read their settings once, at their first computation, so :func:`select_from_environment` runs when
``dataward`` is imported: import dataward before any torch computation (a process that computed first keeps the kernels
it already chose, and :func:`require` then refuses to train a portable ward in it). The user's own environment wins:
``DATAWARD_NUMERICS=native`` turns the pinning off, and any of the variables below set by hand is kept as it is.
"""

from __future__ import annotations

import os
import platform
from typing import Literal

from dataward.errors import DatawardError

Numerics = Literal["portable", "native"]
MODE_ENV = "DATAWARD_NUMERICS"
# What each library reads at its first computation: ATen's kernel level, oneDNN's highest ISA, MKL's conditional
# numerical reproducibility (STRICT: the same bytes whatever the memory alignment)
PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}


def select_from_environment() -> None:
    """Pin the CPU kernels to portable ones unless ``DATAWARD_NUMERICS=native``; variables the user set are kept."""
    if os.environ.get(MODE_ENV, "portable") == "portable" and platform.machine() in ("x86_64", "AMD64"):
        for name, value in PORTABLE_ENV.items():
            os.environ.setdefault(name, value)


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``), or what the platform reports."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def process_numerics() -> Numerics:
    """What this process computes with: portable only if every library runs at the pinned level."""
    import torch

    pinned = all(os.environ.get(name) == value for name, value in PORTABLE_ENV.items())
    return "portable" if pinned and torch.backends.cpu.get_cpu_capability() == "AVX2" else "native"


def fingerprint() -> dict:
    """What decides this process's bytes besides code, seeds and threads; saved in every model's metadata."""
    import torch

    return {
        "mode": process_numerics(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dnnl_max_cpu_isa": os.environ.get("DNNL_MAX_CPU_ISA", "native"),
        "mkl_cbwr": os.environ.get("MKL_CBWR", "native"),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": cpu_name(),
    }


def require(numerics: Numerics) -> None:
    """Refuse to train a portable ward in a process whose kernels are not the portable ones, saying why and what to do."""
    if numerics != "portable" or process_numerics() == "portable":
        return
    now = fingerprint()
    if platform.machine() not in ("x86_64", "AMD64"):
        why = f"portable numerics pin x86-64 kernels and this machine is {platform.machine()}"
    elif os.environ.get(MODE_ENV) == "native":
        why = f"{MODE_ENV}=native is set"
    elif any(os.environ.get(k) != v for k, v in PORTABLE_ENV.items()):
        why = "the environment overrides " + ", ".join(f"{k}={os.environ.get(k)}" for k, v in PORTABLE_ENV.items() if os.environ.get(k) != v)
    elif now["cpu_capability"] != "AVX2":
        why = (f"torch runs {now['cpu_capability']} kernels: this CPU ({now['cpu']}) lacks AVX2, or torch computed before "
               "dataward was imported (import dataward first)")
    else:
        why = "unknown"
    raise DatawardError(f"this ward uses portable numerics (the same bytes on every AVX2 machine) but this process cannot "
                        f"compute them: {why}. Models trained here would not match the ward's lineage")


def differences(recorded: dict | None, current: dict) -> list[str]:
    """What differs between the numerics a model was trained with and this process's, for a failed bitwise check."""
    if not recorded:
        return ["the model records no numerics (trained before dataward recorded them)"]
    keys = ["mode", "cpu_capability", "dnnl_max_cpu_isa", "mkl_cbwr", "torch", "machine"]
    if recorded.get("mode") != "portable":  # native bytes also depend on the exact CPU
        keys.append("cpu")
    return [f"{key}: trained with {recorded.get(key)!r}, here {current.get(key)!r}" for key in keys if recorded.get(key) != current.get(key)]
