"""Where tensors run and in which precision: the one place that knows about CUDA, MPS and CPU bf16."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# benchmarks/pipeline_overhead.py sets this to a file: every pass of the network appends its seconds.
COMPUTE_LOG_ENV = "PAP_SEVERITY_COMPUTE_LOG"


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is available; use train.device=auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("train.device is mps but MPS is not available; use train.device=auto or cpu")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): there bf16 autocast
    trains ResNet-18 2.0x faster than fp32 at 128 px, and the default's resnet18_w16 1.3x at 48 px
    (`benchmarks/train_throughput.py --precision fp32 bf16`). Elsewhere oneDNN emulates it, slower
    than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CPUs and where the GPU has it (fp32's range: a deep net from scratch does not overflow, no
    scaler needed), else float16 with a GradScaler. ResNet-101 from scratch under float16 autocast
    gave NaN outputs in its first fold on Herlev at lr 1e-3."""
    if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def amp_enabled(device: torch.device, amp: bool) -> bool:
    """Whether `train.amp` turns autocast on for this device: CUDA, and CPUs with native bf16."""
    return bool(amp and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())))


def channels_last_pays(device: torch.device, amp: bool) -> bool:
    """channels_last pays on CUDA (cuDNN, tensor cores) and under CPU bf16 autocast (oneDNN's
    blocked kernels: 113 against 95 img/s at 128 px); in CPU fp32 it measured slower (BatchNorm)."""
    return device.type == "cuda" or (device.type == "cpu" and amp)


def autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device), enabled=amp)


class ComputeClock:
    """Seconds a pass spends in the network, by kind (forward, backward, step; attribution for
    IG's forward and backward together), appended as a JSON line to the file COMPUTE_LOG_ENV
    names; a no-op when the variable is unset."""

    def __init__(self, device: torch.device, what: str) -> None:
        self.file = os.environ.get(COMPUTE_LOG_ENV)
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.totals = {"what": what, "forward": 0.0, "backward": 0.0, "step": 0.0}

    @contextmanager
    def __call__(self, kind: str) -> Iterator[None]:
        if not self.file:
            yield
            return
        start = time.perf_counter()
        yield
        self.sync()
        self.totals[kind] = self.totals.get(kind, 0.0) + time.perf_counter() - start

    def write(self) -> None:
        if self.file:
            with open(self.file, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), **self.totals}) + "\n")
