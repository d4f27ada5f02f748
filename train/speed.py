"""Run-time choices that make a training step faster without changing what it computes: bf16 autocast
where the hardware has native bf16, channels_last for conv encoders.

bf16 autocast pays on a CPU only with native bf16 arithmetic (AVX512-BF16 or AMX-BF16): elsewhere oneDNN
emulates it and the step gets slower. The probe reads the CPU's flags at run time (Linux /proc/cpuinfo);
``torch.backends.cpu.get_cpu_capability()`` names the vector ISA torch dispatches to ('AVX512', 'AVX2',
...) and is reported beside them, but it does not say whether bf16 is native.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from models.views import ViewSpec
from .config import Config

LOG = logging.getLogger(__name__)

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (empty where /proc/cpuinfo is not readable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # noqa: BLE001 - older torch builds
        return "unknown"


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return any(f in cpu_flags() for f in BF16_FLAGS)


def cpu_report() -> dict:
    """What the speed choices were based on: torch's ISA level and the bf16 flags present."""
    return {"capability": cpu_capability(), "bf16_flags": [f for f in BF16_FLAGS if f in cpu_flags()],
            "native_bf16": cpu_has_native_bf16(), "threads": torch.get_num_threads()}


def use_amp(amp: str, device: torch.device, has_conv: bool = True) -> bool:
    """Whether to run the encoders under bf16 autocast: ``bf16`` always, ``off`` never, ``auto`` on CUDA and,
    for models with conv encoders, on CPUs with native bf16 (fp32 elsewhere: the MLPs of vector views are too
    small to gain on a CPU). View transforms and the loss stay in fp32 either way."""
    if amp != "auto":
        return amp == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and has_conv and cpu_has_native_bf16())


def use_channels_last(channels_last: bool, has_conv: bool) -> bool:
    """channels_last (NHWC) for conv encoders on CPU and CUDA; vectors have no spatial layout."""
    return channels_last and has_conv


def speed_choices(cfg: Config, specs: list[ViewSpec], device: torch.device) -> tuple[bool, bool]:
    """(bf16 autocast, channels_last) for this config on this device (``use_amp``, ``use_channels_last``)."""
    has_conv = any(s.is_image for s in specs)
    return use_amp(cfg.amp, device, has_conv), use_channels_last(cfg.channels_last, has_conv)


def to_channels_last(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image sources of a batch in channels_last memory format; vectors as they are."""
    return {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v for k, v in batch.items()}
