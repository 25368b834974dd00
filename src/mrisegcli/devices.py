"""``--device``: the names a command takes (auto, cpu, cuda, cuda:N, mps) and the torch device
each one means on this machine."""

from __future__ import annotations

import re
from typing import Any

from mrisegcli.errors import MrisegError
from mrisegcli.settings import SettingError

DEVICE_FORMS = "auto, cpu, cuda, cuda:N (GPU index N) or mps"
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def _mps_available(torch: Any) -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def torch_device(name: str) -> Any:
    """auto, cpu, cuda, cuda:N or mps -> a torch device that exists on this machine. A name of
    another form is a :class:`SettingError` (a usage error); a device this machine lacks a
    :class:`MrisegError`."""
    import torch

    name = name.strip().lower()
    if not DEVICE_RE.fullmatch(name):
        raise SettingError(f"--device must be {DEVICE_FORMS}, not {name!r}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available(torch) else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MrisegError(f"--device {name}: no CUDA device is available (use --device cpu)")
        index = int(name.partition(":")[2] or 0)
        count = torch.cuda.device_count()
        if index >= count:
            raise MrisegError(
                f"--device {name}: there is no CUDA device {index}; this machine has {count} "
                f"(cuda:0 to cuda:{count - 1})"
            )
    if name == "mps" and not _mps_available(torch):
        raise MrisegError("--device mps: MPS is not available (use --device cpu)")
    return torch.device(name)
