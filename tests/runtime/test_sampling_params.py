"""The sampler's penalties, min_p and logprobs against their reference definitions (transformers'
logits processors, OpenAI's penalty formula, log_softmax), each new parameter's checks, and one
readback per call."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers.generation.logits_process import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

from moeflow.errors import InvalidRequest
from moeflow.memory.device import ComputeDevice
from moeflow.runtime.sampling import MAX_LOGPROBS, Sampler, SamplingParams

V = 64


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("min_p", -0.1, r"\[0, 1\]"),
        ("min_p", 1.5, r"\[0, 1\]"),
        ("min_p", float("nan"), "finite"),
        ("min_p", "0.1", "expected a number"),
        ("repetition_penalty", 0.0, "> 0"),
        ("repetition_penalty", -1.0, "> 0"),
        ("repetition_penalty", float("inf"), "finite"),
        ("repetition_penalty", None, "expected a number"),
        ("presence_penalty", 2.5, r"\[-2, 2\]"),
        ("presence_penalty", -2.01, r"\[-2, 2\]"),
        ("frequency_penalty", 3, r"\[-2, 2\]"),
        ("frequency_penalty", True, "expected a number"),
        ("logprobs", -1, r"\[0, 20\]"),
        ("logprobs", MAX_LOGPROBS + 1, r"\[0, 20\]"),
        ("logprobs", 2.0, "got a float"),
        ("logprobs", True, "got a bool"),
    ],
)
def test_each_new_parameter_is_checked_naming_it(field: str, value: object, why: str) -> None:
    with pytest.raises(InvalidRequest, match=rf"{field}=.*{why}"):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_the_first_four_fields_keep_their_order() -> None:
    assert SamplingParams(0.5, 3, 0.9, 7) == SamplingParams(temperature=0.5, top_k=3, top_p=0.9, seed=7)


def test_plain_greedy_is_only_argmax_of_raw_logits() -> None:
    """The step batcher argmaxes `greedy` rows itself, without the Sampler: a penalty or a
    logprobs request must take the Sampler's path."""
    assert SamplingParams().greedy
    assert SamplingParams(min_p=0.3, top_k=2).greedy  # no effect on an argmax
    for changed in ({"repetition_penalty": 1.2}, {"presence_penalty": 0.5}, {"frequency_penalty": -0.5},
                    {"logprobs": 0}):
        assert not SamplingParams(**changed).greedy, changed  # type: ignore[arg-type]


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_matches_transformers_over_prompt_and_output(penalty: float) -> None:
    prompt = [3, 9, 9, 40]
    sampler = Sampler(SamplingParams(repetition_penalty=penalty), prompt)
    generated = []
    for step in range(5):
        logits = _logits(step)
        seen = torch.tensor([prompt + generated])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone()[None])[0]
        assert torch.allclose(sampler.penalised_logits(logits), expected)
        token = sampler(logits)
        assert token == int(expected.argmax())  # greedy on the penalised logits
        generated.append(token)


def test_presence_and_frequency_penalties_follow_openai_over_output_only() -> None:
    prompt = [5]
    sampler = Sampler(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt)
    forced = torch.full((V,), -10.0)
    forced[7] = 10.0
    for _ in range(3):  # 7 generated three times
        assert sampler(forced) == 7
    logits = _logits(1)
    out = sampler.penalised_logits(logits)
    expected = logits.clone()
    expected[7] -= 3 * 0.25 + 0.5  # count * frequency + presence
    assert torch.allclose(out, expected)  # the prompt's 5 is untouched


def test_min_p_matches_transformers_and_never_draws_below_it() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03]))
    min_p = 0.2  # keeps p >= 0.1: tokens 0, 1, 2
    kept = MinPLogitsWarper(min_p)(torch.zeros(1, 1, dtype=torch.long), logits.clone()[None])[0]
    assert torch.isfinite(kept).tolist() == [True, True, True, False, False]
    sampler = Sampler(SamplingParams(temperature=1.0, min_p=min_p, seed=0))
    drawn = {sampler(logits) for _ in range(300)}
    assert drawn == {0, 1, 2}


def test_same_seed_same_tokens_with_every_parameter_set() -> None:
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.95, seed=11, min_p=0.02, repetition_penalty=1.3,
                            presence_penalty=0.4, frequency_penalty=0.2, logprobs=2)
    runs = []
    for _ in range(2):
        sampler = Sampler(params, [1, 2, 3])
        runs.append([sampler(_logits(i)) for i in range(12)])
    assert runs[0] == runs[1]


def test_logprobs_are_the_raw_distribution_with_the_top_k_most_likely_first() -> None:
    sampler = Sampler(SamplingParams(temperature=0.9, seed=4, repetition_penalty=1.5, logprobs=3), [0, 1, 2])
    for step in range(4):
        logits = _logits(step)
        token = sampler(logits)
        raw = torch.log_softmax(logits.double(), dim=-1)  # before penalties and temperature (vLLM's default)
        last = sampler.last
        assert last is not None and last.token == token
        assert last.logprob == pytest.approx(float(raw[token]), abs=1e-9)
        top = torch.topk(raw, 3)
        assert [t for t, _ in last.top] == top.indices.tolist()
        assert [v for _, v in last.top] == pytest.approx(top.values.tolist(), abs=1e-9)
    zero = Sampler(SamplingParams(logprobs=0))
    assert zero(_logits()) == int(_logits().argmax())
    assert zero.last is not None and zero.last.top == []


class _Readbacks(TorchFunctionMode):
    """Counts the calls that bring a tensor's values to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__,
                    torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05, seed=1),
        SamplingParams(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.3),
        SamplingParams(temperature=1.0, seed=2, repetition_penalty=1.2, frequency_penalty=0.5, logprobs=5),
    ],
    ids=["greedy", "sampled", "penalised", "penalised-logprobs"],
)
def test_one_readback_per_call_however_many_parameters(params: SamplingParams) -> None:
    sampler = Sampler(params, list(range(10)))
    for step in range(3):
        logits = _logits(step)
        with _Readbacks() as reads:
            sampler(logits)
        assert reads.count == 1, (step, reads.count)
    device = ComputeDevice()  # given the device's readback, the one read is the device's (counted)
    again = Sampler(params, list(range(10)))
    tokens = [again(_logits(step), device.readback) for step in range(3)]
    assert device.host_syncs == 3
    fresh = Sampler(params, list(range(10)))
    assert tokens == [fresh(_logits(step)) for step in range(3)]
