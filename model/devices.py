"""The one device resolver: what "auto", "cpu", "cuda" or "cuda:N" means on this machine.

Both the region extractors and `RetrievalModel` take a device setting; resolving it in one place
means both refuse CUDA on a machine without it with the same message, when they are built
rather than at their first batch.
"""

from __future__ import annotations

import torch

DEVICE_AUTO = "auto"


class DeviceUnavailable(ValueError):
    """A CUDA device was asked for, but this machine (or this torch build) has none."""


def resolve_device(device: str | torch.device = DEVICE_AUTO) -> torch.device:
    """ "auto" picks CUDA when present, else CPU; anything else is passed to torch.device.
    Asking for CUDA on a machine without it fails here, not at the first batch."""
    if isinstance(device, str) and device == DEVICE_AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"device {str(device)!r} was asked for but CUDA is not available; use 'cpu' or 'auto'"
        )
    return resolved


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: CUDA that supports bf16, or a CPU
    with AVX512-BF16 or AMX (where oneDNN's bf16 GEMMs beat fp32 ones); elsewhere bf16 would be
    emulated, slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False
