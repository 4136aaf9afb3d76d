"""Every tensor a step creates lives on the compute device: caught on the CPU with the meta device."""

from __future__ import annotations

import pytest
import torch

from moeflow.runtime.layers import attention_mask
from moeflow.runtime.sampling import Sampler, SamplingParams
from tests.conftest import HFCheckpoints
from tests.hf_models import FAMILIES
from tests.runtime.opcount import OpCounter, dense_part, load_model

META = torch.device("meta")


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_create_no_tensor_off_the_model_device(hf_checkpoints: HFCheckpoints, family: str) -> None:
    # A model on 'meta' stands in for a GPU: any tensor built without device= lands on the CPU,
    # which is what made every CUDA prefill fail (the attention mask).
    model = load_model(hf_checkpoints.path(family), device="meta")
    for layer in model.layers:
        step = dense_part(model, layer)
        cache = layer.attention.new_cache(model.dtype)
        h = torch.empty(7, model.arch.hidden_size, dtype=model.dtype, device=META)
        with OpCounter(META) as counter:
            step(h[:6], cache)  # prefill: causal mask, rope tables grown
            step(h[6:], cache)  # decode
        assert counter.record.off_device == [], f"{family} layer {layer.index}"
        assert counter.record.total > 0


def test_sliding_window_mask_is_built_on_the_queries_device() -> None:
    mask = attention_mask(3, 4, window=2, device=META)
    assert mask is not None and mask.device == META and mask.shape == (4, 7)


def test_masks_allow_the_causal_window_only() -> None:
    mask = attention_mask(2, 3, window=2, device=torch.device("cpu"))
    assert mask is not None
    expected = [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert mask.int().tolist() == expected
    assert attention_mask(4, 1, window=None, device=torch.device("cpu")) is None


def test_sampler_samples_on_the_logits_device() -> None:
    # The generator must live where the logits are (torch.multinomial refuses a CPU generator
    # for CUDA probabilities); meta tensors have no values, so check the device it was made for.
    sampler = Sampler(SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3))
    logits = torch.randn(32, generator=torch.Generator().manual_seed(0))
    first = [sampler(logits) for _ in range(8)]
    assert sampler.generator is not None and sampler.generator.device == logits.device
    again = Sampler(SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3))
    assert [again(logits) for _ in range(8)] == first
