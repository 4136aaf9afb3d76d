"""Dense building blocks against transformers' own arithmetic, bit for bit where the code claims it."""

from __future__ import annotations

import pytest
import torch

from moeflow.runtime.layers import rms_norm


def _transformers_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_bit_identical_to_transformers(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    for shape in ((1, 64), (7, 64), (1, 4, 16), (3, 1024), (2, 8, 128)):
        x = (torch.randn(shape, generator=gen) * 3).to(dtype)
        w = torch.randn(shape[-1], generator=gen).to(dtype)
        assert torch.equal(rms_norm(x, w, 1e-6), _transformers_rms_norm(x, w, 1e-6)), (dtype, shape)
