"""`moeflow run` prints its plan in one line, then streams the text as each token comes (flushed)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from moeflow.cli import main
from tests.cli_models import synth_model


class _Recorder(io.StringIO):
    """stdout that notes what had been written each time it is flushed, and when."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes: list[tuple[float, str]] = []

    def flush(self) -> None:
        self.flushes.append((time.perf_counter(), self.getvalue()))
        super().flush()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_model(tmp_path_factory)


def _greedy(model: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    assert main(["run", str(model), "--prompt", "The quick brown fox", "--max-new-tokens", "12", "--device", "cpu",
                 "--ignore-eos", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.timeout(120)
def test_run_prints_the_plan_then_streams_each_token_flushed(model: Path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _greedy(model, capsys)["text"]
    out = _Recorder()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["run", str(model), "--prompt", "The quick brown fox", "--max-new-tokens", "12", "--device", "cpu",
                 "--ignore-eos", "--expert-budget", "50%"]) == 0
    err = capsys.readouterr().err
    plan = [line for line in err.splitlines() if line.startswith("plan: ")]
    assert len(plan) == 1 and all(word in plan[0] for word in ("budget 50%", "slots", "predictor", "policy"))
    assert "12 tokens" in err and "tok/s decode" in err and "hit rate" in err
    assert out.getvalue() == expected + "\n"  # the streamed text is generate's text
    # one flush per generated token (plus the end): the text reaches the terminal as it comes
    grew = [text for _, text in out.flushes]
    assert len(grew) >= 12 and grew == sorted(grew, key=len)
    assert len({text for text in grew if text}) >= 3, "text came out in one piece at the end"


@pytest.mark.timeout(120)
def test_run_stops_before_a_stop_string(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = _greedy(model, capsys)["text"]
    stop = text[4:6]
    assert main(["run", str(model), "--prompt", "The quick brown fox", "--max-new-tokens", "12", "--device", "cpu",
                 "--ignore-eos", "--stop", stop]) == 0
    captured = capsys.readouterr()
    assert captured.out == text[: text.index(stop)] + "\n"
    assert "(stop)" in captured.err


@pytest.mark.timeout(120)
def test_run_passes_stop_and_the_sampling_options_to_the_engine(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import asyncio

    from moeflow.api import Engine

    greedy = _greedy(model, capsys)
    stop = greedy["text"][4:6]
    stopped = _greedy(model, capsys, "--stop", stop)
    assert stopped["text"] == greedy["text"][: greedy["text"].index(stop)] and stopped["finish_reason"] == "stop"
    options = {"repetition_penalty": 3.0, "temperature": 1.0, "seed": 5, "min_p": 0.2, "top_k": 50}
    flags = [x for name, value in options.items() for x in (f"--{name.replace('_', '-')}", str(value))]
    sampled = _greedy(model, capsys, *flags)

    async def api() -> list[int]:
        async with Engine.open(model, device="cpu") as eng:
            res = await eng.generate("The quick brown fox", 12, stop_at_eos=False, **options)  # type: ignore[arg-type]
            return res.tokens

    assert sampled["tokens"] == asyncio.run(api()) != greedy["tokens"]


@pytest.mark.timeout(120)
def test_run_json_prints_one_object_with_the_plan(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = _greedy(model, capsys, "--expert-budget", "50%")
    assert len(result["tokens"]) == 12 and result["finish_reason"] == "length"
    assert result["plan"]["expert_budget"] == "50%" and result["plan"]["slots"]["fast"] == 8


@pytest.mark.timeout(120)
def test_run_takes_a_hugging_face_repo_id_from_the_local_cache(
        model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.models.test_hub import add_snapshot

    cache = tmp_path / "hf" / "hub"
    snapshot = add_snapshot(cache, "tiny-org/tiny-moe", "0123456789abcdef0123456789abcdef01234567",
                            model)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("MOEFLOW_CACHE", str(tmp_path / "moeflow-cache"))
    expected = _greedy(model, capsys)["text"]
    assert _greedy(Path("tiny-org/tiny-moe"), capsys)["text"] == expected
    assert not (snapshot / ".moeflow").exists()  # the store went to the user cache
    assert main(["run", "tiny-org/absent", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert "models--tiny-org--absent" in err and str(cache) in err
