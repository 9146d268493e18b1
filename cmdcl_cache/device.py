"""The device a command runs on: `auto`, `cpu`, `cuda`, `cuda:N`, checked against this machine."""

from __future__ import annotations


class DeviceError(ValueError):
    """A device name that does not parse, or a GPU this machine does not have."""


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"--device {name!r}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device
