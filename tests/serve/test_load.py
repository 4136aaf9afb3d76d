"""Many concurrent streaming clients, some leaving midway: results equal solo runs, nothing leaks, /metrics agrees."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moeflow.api import Engine
from moeflow.serve import create_app
from tests.serve.conftest import engine_options, live_server, wait_idle

CLIENTS, LEAVERS, TOKENS, LEAVER_TOKENS, LEAVE_AFTER = 64, 8, 20, 400, 3


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def _stream(http: httpx.AsyncClient, prompt: str, max_tokens: int, leave_after: int | None) -> tuple[str, dict[str, int] | None, str | None, int]:
    """(text, usage, finish_reason, events seen); leaves after `leave_after` events if given."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, usage, finish, events = "", None, None, 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            event = json.loads(line[len("data: "):])
            events += 1
            if event["choices"]:
                text += event["choices"][0]["text"]
                finish = event["choices"][0]["finish_reason"] or finish
            usage = event.get("usage") or usage
            if leave_after is not None and events >= leave_after:
                break  # closing the response drops the connection mid-stream
    return text, usage, finish, events


@pytest.mark.asyncio
@pytest.mark.timeout(300)
async def test_concurrent_streams_equal_solo_runs_and_leavers_free_everything(tiny_model: Path) -> None:
    prompts = [f"def task_{i}(x):\n    return " + "x + " * (i % 5) for i in range(CLIENTS)]
    leavers = set(range(0, CLIENTS, CLIENTS // LEAVERS))
    async with Engine.open(tiny_model, **engine_options()) as eng:
        solo = {i: await eng.generate(p, TOKENS) for i, p in enumerate(prompts) if i not in leavers}
        tokens_before = eng.stats()["tokens"]
        prompt_tokens = sum(len(eng.encode(p)) for p in prompts)
        async with live_server(create_app(eng, model_name="tiny")) as url:
            limits = httpx.Limits(max_connections=CLIENTS)
            async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
                results = await asyncio.gather(*(
                    _stream(http, p, LEAVER_TOKENS if i in leavers else TOKENS, LEAVE_AFTER if i in leavers else None)
                    for i, p in enumerate(prompts)))
                assert await wait_idle(eng) == (0, 0)
                metrics = _samples((await http.get("/metrics")).text)
                engine_stats = eng.stats()  # nothing runs now: the scrape saw these same figures

    seen_by_leavers = 0
    for i, (text, usage, finish, events) in enumerate(results):
        if i in leavers:
            assert events == LEAVE_AFTER and usage is None
            seen_by_leavers += events
            continue
        expected = solo[i]
        assert text == expected.text.replace("</s>", "") if expected.finish_reason == "eos" else text == expected.text
        assert finish == ("length" if expected.finish_reason == "length" else "stop")
        assert usage == {"prompt_tokens": len(expected.prompt_tokens), "completion_tokens": len(expected.tokens),
                         "total_tokens": len(expected.prompt_tokens) + len(expected.tokens)}

    completed_tokens = sum(r[1]["completion_tokens"] for i, r in enumerate(results) if i not in leavers)  # type: ignore[index]
    served_tokens = metrics[("moeflow_completion_tokens_total", ())]
    assert metrics[("moeflow_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == CLIENTS
    finished = {reason: metrics.get(("moeflow_completions_finished_total", (("finish_reason", reason),)), 0.0)
                for reason in ("length", "stop", "cancelled")}
    assert finished["length"] + finished["stop"] == CLIENTS - LEAVERS
    assert finished["cancelled"] == LEAVERS
    assert metrics[("moeflow_prompt_tokens_total", ())] == prompt_tokens
    # every token the engine made for these clients is counted: the completed ones' usage, plus the
    # leavers' tokens, at least one per event they read and far fewer than they asked for
    assert served_tokens == metrics[("moeflow_engine_tokens_total", ())] - tokens_before
    assert completed_tokens + seen_by_leavers <= served_tokens < completed_tokens + LEAVERS * LEAVER_TOKENS // 2
    assert metrics[("moeflow_requests_in_flight", ())] == 0
    assert metrics[("moeflow_queue_depth", ())] == 0
    assert metrics[("moeflow_pinned_blocks", ())] == 0
    for field, name in (("hit_rate", "moeflow_expert_hit_rate"), ("stall_seconds", "moeflow_stall_seconds_total"),
                        ("bytes_loaded", "moeflow_bytes_loaded_total"), ("host_syncs", "moeflow_host_syncs_total")):
        assert metrics[(name, ())] == pytest.approx(engine_stats[field], rel=1e-12), name
    assert engine_stats["bytes_loaded"] > 0 and engine_stats["host_syncs"] > 0
