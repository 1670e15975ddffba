"""The machine a benchmark ran on, recorded in every result file: CPU model, cores, backend,
device, jax and jaxlib versions, and the date."""

from __future__ import annotations

import datetime
import os
import pathlib
import platform

import jax
import jaxlib


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """``{cpu, cores, platform, backend, device, jax, jaxlib, date}`` of this process."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "date": datetime.date.today().isoformat(),
    }
