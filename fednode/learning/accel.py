"""Where and in what precision a node trains: a pure choice from what the machine has.

`select_placement(device, precision, quantization, available)` turns the `[learning]` keys
`device`, `precision` and `quantization` plus an `Available` (what this machine offers) into a
`Placement`, or a ConfigError that names the key. It imports nothing heavy, so the choice is tested
for every branch (cuda, mps, cpu) by passing availability in; `Available.probe()` asks torch.

Rules (`auto` everywhere picks the fastest setting that is safe):
- device `auto`: cuda, then mps, then cpu. Asking for a device the machine lacks is an error.
- precision `auto`: bf16 on a cuda device that supports it, else fp16 on cuda or mps (with a
  gradient scaler), fp32 on cpu (CPU autocast is slow without AMX and keeps CPU runs bit-exact).
  Explicit bf16 works on cuda (if supported), mps and cpu; fp16 needs cuda or mps.
  Half precision is autocast only: trainable LoRA weights, the optimizer state and every adapter a
  node sends stay fp32, so GPU and CPU members of one community exchange equal layouts.
- quantization `4bit`: QLoRA (the frozen base in NF4 through bitsandbytes); needs cuda.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fednode.config import DEVICE_CHOICES, PRECISION_CHOICES, QUANTIZATION_CHOICES
from fednode.errors import ConfigError

Device = Literal["cpu", "cuda", "mps"]
Precision = Literal["fp32", "bf16", "fp16"]
Quantization = Literal["none", "4bit"]



@dataclass(frozen=True)
class Available:
    """What this machine offers (cuda_bf16: the cuda device computes in bf16 natively)."""

    cuda: bool = False
    cuda_bf16: bool = False
    mps: bool = False
    bitsandbytes: bool = False

    @classmethod
    def probe(cls) -> Available:
        import importlib.util

        import torch

        cuda = bool(torch.cuda.is_available())
        mps_backend = getattr(torch.backends, "mps", None)
        mps = bool(mps_backend is not None and mps_backend.is_available())
        return cls(
            cuda=cuda,
            cuda_bf16=cuda and bool(torch.cuda.is_bf16_supported(including_emulation=False)),
            mps=mps,
            bitsandbytes=importlib.util.find_spec("bitsandbytes") is not None,
        )


@dataclass(frozen=True)
class Placement:
    device: Device
    precision: Precision
    quantization: Quantization = "none"

    @property
    def autocast(self) -> bool:
        return self.precision != "fp32"

    @property
    def grad_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range."""
        return self.precision == "fp16"

    def describe(self) -> str:
        quant = "" if self.quantization == "none" else f", {self.quantization} base"
        return f"{self.device}, {self.precision}{quant}"


def select_device(requested: str, available: Available) -> Device:
    if requested not in DEVICE_CHOICES:
        raise ConfigError(f"learning.device: expected one of {DEVICE_CHOICES}, got {requested!r}")
    if requested == "auto":
        return "cuda" if available.cuda else "mps" if available.mps else "cpu"
    if requested == "cuda" and not available.cuda:
        raise ConfigError("learning.device = \"cuda\" but torch sees no CUDA device on this machine "
                          "(is a CUDA build of torch installed? see scripts/setup, FEDNODE_TORCH=cuda)")
    if requested == "mps" and not available.mps:
        raise ConfigError("learning.device = \"mps\" but torch's MPS backend is not available here")
    return requested  # type: ignore[return-value]


def select_precision(requested: str, device: Device, available: Available) -> Precision:
    if requested not in PRECISION_CHOICES:
        raise ConfigError(f"learning.precision: expected one of {PRECISION_CHOICES}, got {requested!r}")
    if requested == "auto":
        if device == "cuda":
            return "bf16" if available.cuda_bf16 else "fp16"
        return "fp16" if device == "mps" else "fp32"
    if requested == "bf16" and device == "cuda" and not available.cuda_bf16:
        raise ConfigError("learning.precision = \"bf16\" but this CUDA device has no native bf16; use fp16 or auto")
    if requested == "fp16" and device == "cpu":
        raise ConfigError("learning.precision = \"fp16\" needs a cuda or mps device (learning.device resolved "
                          "to cpu); use bf16 or fp32 on cpu")
    return requested  # type: ignore[return-value]


def select_placement(device: str = "auto", precision: str = "auto", quantization: str = "none",
                     available: Available | None = None) -> Placement:
    """The placement for these `[learning]` settings on a machine offering `available`
    (None = probe this machine)."""
    have = Available.probe() if available is None else available
    if quantization not in QUANTIZATION_CHOICES:
        raise ConfigError(f"learning.quantization: expected one of {QUANTIZATION_CHOICES}, got {quantization!r}")
    dev = select_device(device, have)
    prec = select_precision(precision, dev, have)
    if quantization == "4bit":
        if dev != "cuda":
            raise ConfigError(f"learning.quantization = \"4bit\" (QLoRA through bitsandbytes) needs a CUDA device; "
                              f"learning.device resolved to {dev}. Set quantization = \"none\"")
        if not have.bitsandbytes:
            raise ConfigError("learning.quantization = \"4bit\" needs the bitsandbytes package "
                              "(pip install bitsandbytes, into the node's environment)")
    return Placement(dev, prec, quantization)  # type: ignore[arg-type]
