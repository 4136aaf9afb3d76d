"""bench_overhead's eager floor is a real Mixtral decoder: transformers' logits and greedy tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.conftest import HFCheckpoints
from tests.hf_models import load_hf

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benches"))
from eager_floor import EagerMixtral  # noqa: E402

PROMPT = [5, 17, 42, 3, 77, 12, 9, 60, 31, 8]


def test_the_floor_decodes_like_transformers(hf_checkpoints: HFCheckpoints) -> None:
    hf = load_hf(hf_checkpoints.path("mixtral"))
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        want_logits = hf(ids).logits[0, -1].float()
        want = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()
    floor = EagerMixtral(hf)
    tokens, times = floor.generate(PROMPT, 12)
    assert floor.first_logits is not None
    torch.testing.assert_close(floor.first_logits, want_logits, rtol=1e-4, atol=1e-5)
    assert tokens == want and len(times) == 12
