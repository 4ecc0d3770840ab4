"""Choice of model arithmetic (fp32 / bf16): explicit requests, auto per device, bad requests."""

import pytest

from proxyprompt.errors import InputError
from proxyprompt.models import base


def test_explicit_precision_is_kept():
    assert base.select_precision("fp32", "cuda") == "fp32"
    assert base.select_precision("BF16", "cpu") == "bf16"


def test_auto_is_bf16_on_cuda_fp32_on_mps():
    assert base.select_precision("auto", "cuda") == "bf16"
    assert base.select_precision("auto", "mps") == "fp32"


@pytest.mark.parametrize("amx", [True, False])
def test_auto_on_cpu_is_bf16_only_with_amx(monkeypatch, amx):
    monkeypatch.setattr(base, "cpu_has_amx", lambda: amx)
    assert base.select_precision("auto", "cpu") == ("bf16" if amx else "fp32")


def test_avx512_bf16_without_amx_is_not_enough(monkeypatch):
    """AVX512-BF16 alone ran bf16 slower than fp32 (measured): auto must not pick bf16 for it."""
    import torch

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert base.select_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert base.select_precision("auto", "cpu") == "bf16"


def test_bad_precision_requests_are_input_errors():
    with pytest.raises(InputError, match="unknown precision"):
        base.select_precision("fp16", "cpu")
    with pytest.raises(InputError, match="MPS"):
        base.select_precision("bf16", "mps")


def test_autocast_is_a_no_op_for_fp32():
    torch = pytest.importorskip("torch")
    with base.autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with base.autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
