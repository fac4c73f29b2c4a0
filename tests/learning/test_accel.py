"""Device / precision / quantization choice as a pure function of what the machine offers: every
branch (cuda, mps, cpu) is exercised here by passing availability in, on any machine."""

from __future__ import annotations

import pytest

from fednode.errors import ConfigError
from fednode.learning.accel import Available, Placement, select_device, select_placement, select_precision

CPU_ONLY = Available()
MPS = Available(mps=True)
CUDA_BF16 = Available(cuda=True, cuda_bf16=True, mps=False, bitsandbytes=True)
CUDA_OLD = Available(cuda=True, cuda_bf16=False)  # e.g. a T4 / V100: fp16 only
CUDA_AND_MPS = Available(cuda=True, cuda_bf16=True, mps=True)


@pytest.mark.parametrize(
    ("available", "device"),
    [(CPU_ONLY, "cpu"), (MPS, "mps"), (CUDA_BF16, "cuda"), (CUDA_OLD, "cuda"), (CUDA_AND_MPS, "cuda")],
)
def test_auto_device_prefers_cuda_then_mps_then_cpu(available: Available, device: str) -> None:
    assert select_device("auto", available) == device
    assert select_device("cpu", available) == "cpu"  # cpu is always there


@pytest.mark.parametrize(
    ("available", "expected"),
    [(CPU_ONLY, Placement("cpu", "fp32")), (MPS, Placement("mps", "fp16")),
     (CUDA_BF16, Placement("cuda", "bf16")), (CUDA_OLD, Placement("cuda", "fp16"))],
)
def test_auto_everything(available: Available, expected: Placement) -> None:
    placement = select_placement("auto", "auto", "none", available)
    assert placement == expected
    assert placement.autocast == (expected.precision != "fp32")
    assert placement.grad_scaler == (expected.precision == "fp16")  # bf16 needs no loss scaling


@pytest.mark.parametrize(
    ("device", "precision", "available", "match"),
    [
        ("cuda", "auto", CPU_ONLY, r"learning\.device = \"cuda\".*no CUDA"),
        ("mps", "auto", CUDA_BF16, r"learning\.device = \"mps\""),
        ("cpu", "fp16", CUDA_BF16, r"learning\.precision = \"fp16\".*cpu"),
        ("auto", "fp16", CPU_ONLY, r"learning\.precision = \"fp16\""),
        ("cuda", "bf16", CUDA_OLD, r"learning\.precision = \"bf16\".*no native bf16"),
        ("gpu", "auto", CUDA_BF16, r"learning\.device: expected one of"),
        ("auto", "fp8", CUDA_BF16, r"learning\.precision: expected one of"),
    ],
)
def test_impossible_choices_are_config_errors_naming_the_key(
    device: str, precision: str, available: Available, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        select_placement(device, precision, "none", available)


def test_explicit_choices_the_device_supports() -> None:
    assert select_precision("bf16", "cpu", CPU_ONLY) == "bf16"  # CPU autocast has bf16
    assert select_precision("fp32", "cuda", CUDA_BF16) == "fp32"
    assert select_precision("fp16", "cuda", CUDA_BF16) == "fp16"
    assert select_precision("fp16", "mps", MPS) == "fp16"
    assert select_placement("cpu", "auto", "none", CUDA_BF16) == Placement("cpu", "fp32")


def test_four_bit_needs_cuda_and_bitsandbytes() -> None:
    assert select_placement("auto", "auto", "4bit", CUDA_BF16) == Placement("cuda", "bf16", "4bit")
    with pytest.raises(ConfigError, match=r"learning\.quantization = \"4bit\".*needs a CUDA device.*cpu"):
        select_placement("auto", "auto", "4bit", CPU_ONLY)
    with pytest.raises(ConfigError, match=r"needs a CUDA device.*resolved to cpu"):
        select_placement("cpu", "auto", "4bit", CUDA_BF16)
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes package"):
        select_placement("cuda", "auto", "4bit", Available(cuda=True, cuda_bf16=True, bitsandbytes=False))
    with pytest.raises(ConfigError, match=r"learning\.quantization: expected one of"):
        select_placement("auto", "auto", "8bit", CUDA_BF16)


def test_probe_reports_this_machine() -> None:
    import importlib.util

    import torch

    here = Available.probe()
    assert here.cuda == torch.cuda.is_available()
    assert here.bitsandbytes == (importlib.util.find_spec("bitsandbytes") is not None)
    assert select_placement().device == select_device("auto", here)
