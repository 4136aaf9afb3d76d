"""A failed expert load fails its request, never the engine: under each injected fault (the
transfer engine's test-only fault plan, a completion callback that raises, bytes of the wrong
size) the request ends in a typed error naming the file, layer and expert, no block stays
pinned, and the next request on the same engine gives a fault-free engine's tokens and logits.
A seeded random run of generate / cancel / close under faults ends in one of those two states."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from moeflow import Engine
from moeflow.errors import EngineClosed, MoeflowError, StoreError, TransferError
from moeflow.memory.cache import ExpertCache
from moeflow.memory.sources import HomeSource, HostCacheSource, StoreSource
from moeflow.memory.policies import ExpertKey

PROMPTS = ([5, 17, 42, 3, 77, 12, 9, 60], [11, 4, 90, 23, 7], [31, 8, 66, 2, 50, 19])
NEW_TOKENS = 3
CHUNK = 4096  # every tiny expert (20 KiB) is read in several parts: a fault aims at one
# device "sim3": a simulated GPU whose experts come through a pinned host cache from the disk
SETUPS: dict[str, dict[str, Any]] = {
    "cpu": {"device": "cpu"},
    "sim3": {"device": "sim", "host_budget": "50%"},
}
SIM2 = {"device": "sim"}  # every expert in a pinned host home: loads are device copies only
Outputs = dict[int, tuple[list[int], torch.Tensor]]
_references: dict[Path, Outputs] = {}


async def _outputs(eng: Engine, which: range | list[int] = range(len(PROMPTS))) -> Outputs:
    out: Outputs = {}
    for i in which:
        result = await asyncio.wait_for(eng.generate(PROMPTS[i], max_new_tokens=NEW_TOKENS), 30)
        out[i] = (result.tokens, await asyncio.wait_for(eng.logits(PROMPTS[i]), 30))
    return out


async def _reference(path: Path) -> Outputs:
    """What a fault-free CPU engine answers (every budget and device gives the same)."""
    if path not in _references:
        async with Engine.open(path, device="cpu", io_chunk=CHUNK) as eng:
            _references[path] = await _outputs(eng)
    return _references[path]


_smallest: dict[Path, int] = {}


async def _open(path: Path, setup: str) -> Engine:
    if path not in _smallest:
        async with Engine.open(path, device="cpu") as probe:
            _smallest[path] = probe.plan.block_bytes * probe.plan.top_k
    # the smallest budget: every request loads experts (and evicts), the next one too
    options = SIM2 if setup == "sim2" else SETUPS[setup]
    return await Engine.open(path, expert_budget=_smallest[path], io_chunk=CHUNK, **options)


def _store_source(eng: Engine) -> StoreSource:
    source = eng.session.cache.source
    if isinstance(source, HostCacheSource):
        source = source.host.source
    assert isinstance(source, StoreSource)
    return source


def _aim_at_layer(eng: Engine, kind: str, **options: Any) -> int:
    """Arm `kind` on every read of the first MoE layer's experts (whichever the request needs
    first meets it); returns that layer."""
    source = _store_source(eng)
    layer = eng.session.arch.moe_layers[0]
    for expert in range(eng.session.arch.num_experts):
        eng.session.transfers.engine.add_test_fault(
            kind, file_id=source.file_id, offset=source.store.offset(layer, expert) + 5000, count=0, **options
        )
    return layer


def _pinned(eng: Engine) -> int:
    return int(eng.stats().as_dict()["pinned_blocks"])


def _data_path(eng: Engine) -> Path:
    source = eng.session.cache.source
    return source.home.store.data_path if isinstance(source, HomeSource) else _store_source(eng).store.data_path


def _check_named(error: BaseException, eng: Engine, layer: int | None) -> None:
    assert isinstance(error, (StoreError, TransferError)), repr(error)
    assert str(_data_path(eng)) in str(error), error
    found = re.search(r"\(layer (\d+), expert (\d+)\)", str(error))
    assert found is not None, error
    if layer is not None:
        assert int(found.group(1)) == layer, error
    assert 0 <= int(found.group(2)) < eng.session.arch.num_experts


async def _fails_then_recovers(eng: Engine, path: Path, layer: int | None, words: str) -> None:
    with pytest.raises(MoeflowError) as info:
        await asyncio.wait_for(eng.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS), 30)
    _check_named(info.value, eng, layer)
    assert words in str(info.value), info.value
    assert _pinned(eng) == 0
    eng.session.transfers.engine.clear_test_faults()
    assert_equal(await _outputs(eng, [0, 1]), await _reference(path))


def assert_equal(got: Outputs, want: Outputs) -> None:
    for i, (tokens, logits) in got.items():
        assert tokens == want[i][0], f"prompt {i}: tokens differ"
        assert torch.equal(logits, want[i][1]), f"prompt {i}: logits differ"


@pytest.mark.timeout(120)
@pytest.mark.asyncio
@pytest.mark.parametrize("setup", SETUPS)
@pytest.mark.parametrize(
    ("kind", "words"),
    [("errno", "EIO"), ("short_read", "short read"), ("corrupt", "checksum mismatch"), ("panic", "panicked")],
)
async def test_an_injected_read_fault_fails_the_request_then_the_engine_serves(
    hf_checkpoints: Any, setup: str, kind: str, words: str
) -> None:
    path = hf_checkpoints.path("mixtral")
    eng = await _open(path, setup)
    try:
        layer = _aim_at_layer(eng, kind)
        await _fails_then_recovers(eng, path, layer, words)
        assert eng.session.transfers.engine.test_fault_hits() > 0
    finally:
        await asyncio.wait_for(eng.aclose(), 10)


@pytest.mark.timeout(120)
@pytest.mark.asyncio
@pytest.mark.parametrize("setup", SETUPS)
async def test_every_request_in_flight_and_aclose_end_in_bounded_time_under_a_lasting_fault(
    hf_checkpoints: Any, setup: str
) -> None:
    path = hf_checkpoints.path("mixtral")
    eng = await _open(path, setup)
    try:
        layer = _aim_at_layer(eng, "errno")
        requests = [eng.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=NEW_TOKENS) for i in range(6)]
        results = await asyncio.wait_for(asyncio.gather(*requests, return_exceptions=True), 30)
        for result in results:
            assert isinstance(result, MoeflowError), result  # each needs the first layer's experts
            _check_named(result, eng, layer)
        assert _pinned(eng) == 0
        late = asyncio.ensure_future(eng.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS))
        await asyncio.sleep(0)
    finally:
        await asyncio.wait_for(eng.aclose(), 10)
    with pytest.raises(MoeflowError):  # its load failed, or the engine closed first
        await asyncio.wait_for(late, 5)


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_a_panic_issuing_a_device_copy_fails_the_request_then_the_engine_serves(hf_checkpoints: Any) -> None:
    """The simulated GPU with every expert in a pinned host home: loads are device copies, and
    the copy-stream issuer thread panics at each one until cleared."""
    path = hf_checkpoints.path("mixtral")
    eng = await _open(path, "sim2")
    try:
        source = eng.session.cache.source
        assert isinstance(source, HomeSource)
        eng.session.transfers.engine.add_test_fault("panic", op="copy", count=0)
        with pytest.raises(TransferError) as info:
            await asyncio.wait_for(eng.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS), 30)
        assert "panicked" in str(info.value)
        _check_named(info.value, eng, None)
        assert _pinned(eng) == 0
        eng.session.transfers.engine.clear_test_faults()
        assert_equal(await _outputs(eng, [0, 1]), await _reference(path))
    finally:
        await asyncio.wait_for(eng.aclose(), 10)


@pytest.mark.timeout(120)
@pytest.mark.asyncio
@pytest.mark.parametrize("setup", SETUPS)
async def test_a_completion_callback_that_raises_fails_the_request_not_the_engine(
    hf_checkpoints: Any, setup: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the exception was logged and swallowed, the expert stayed 'loading', and the
    request waited forever holding the step lock (so did every other request and aclose)."""
    path = hf_checkpoints.path("mixtral")
    eng = await _open(path, setup)
    try:
        layer = eng.session.arch.moe_layers[0]
        policy = eng.session.cache.policy
        insert = policy.on_insert

        def broken(key: ExpertKey) -> None:
            if key[0] == layer:
                raise RuntimeError("policy bookkeeping failed")
            insert(key)

        monkeypatch.setattr(policy, "on_insert", broken)
        try:
            result = await asyncio.wait_for(eng.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS), 30)
        except MoeflowError as error:
            assert "policy bookkeeping failed" in str(error)
            assert isinstance(error.__cause__, RuntimeError)
            _check_named(error, eng, layer)
        else:
            # On a device a copy's bytes are used once issued, before its completion: a request
            # that already ran every expert it needed is answered (rightly), not failed.
            assert setup != "cpu", "the CPU engine had to fail the request"
            assert result.tokens == (await _reference(path))[0][0]
        assert _pinned(eng) == 0
        monkeypatch.undo()
        assert_equal(await _outputs(eng, [0, 1]), await _reference(path))
    finally:
        await asyncio.wait_for(eng.aclose(), 10)


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_bytes_of_the_wrong_size_for_the_layout_fail_the_request_not_the_engine(
    hf_checkpoints: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's case: a slot whose shape no longer fits the expert's bytes (a manifest changed
    under an open engine) made the completion callback raise, and the request hang."""
    path = hf_checkpoints.path("mixtral")
    eng = await _open(path, "cpu")
    try:
        source = _store_source(eng)
        good = source.layout
        first = good.slots[0]
        wide = dataclasses.replace(first, shape=(first.shape[0] * 4, *first.shape[1:]))
        monkeypatch.setattr(source, "layout", dataclasses.replace(good, slots=(wide, *good.slots[1:])))
        with pytest.raises(StoreError) as info:
            await asyncio.wait_for(eng.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS), 30)
        assert "is invalid for input of size" in str(info.value) and "store_mode='rebuild'" in str(info.value)
        _check_named(info.value, eng, None)
        assert _pinned(eng) == 0
        monkeypatch.undo()
        assert_equal(await _outputs(eng, [0, 1]), await _reference(path))
    finally:
        await asyncio.wait_for(eng.aclose(), 10)


@pytest.mark.timeout(120)
@pytest.mark.asyncio
@pytest.mark.parametrize("setup", SETUPS)
async def test_a_delayed_load_is_waited_for_cancelled_cleanly_and_closed_within_the_delay(
    hf_checkpoints: Any, setup: str
) -> None:
    path = hf_checkpoints.path("mixtral")
    eng = await _open(path, setup)
    try:
        _aim_at_layer(eng, "delay", delay=0.2)
        began = time.perf_counter()
        assert_equal(await _outputs(eng, [0]), await _reference(path))  # slower, still right
        assert time.perf_counter() - began >= 0.2
        task = asyncio.ensure_future(eng.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS))
        await asyncio.sleep(0.1)  # inside a delayed load
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert _pinned(eng) == 0
        eng.session.transfers.engine.clear_test_faults()
        assert_equal(await _outputs(eng, [1, 2]), await _reference(path))
        _aim_at_layer(eng, "delay", delay=0.3)
        inflight = asyncio.ensure_future(eng.generate(PROMPTS[2], max_new_tokens=NEW_TOKENS))
        await asyncio.sleep(0.1)
    finally:
        began = time.perf_counter()
        await asyncio.wait_for(eng.aclose(), 10)  # waits for the step in flight, then closes
    assert time.perf_counter() - began < 5
    try:  # closing lets the step in flight finish, then refuses the request's next step
        result = await asyncio.wait_for(inflight, 1)
    except EngineClosed:
        pass
    else:
        assert result.tokens == (await _reference(path))[2][0]


FAULTS = ("errno", "short_read", "corrupt", "panic", "delay", "callback", None)


@pytest.mark.timeout(240)
@pytest.mark.asyncio
async def test_random_requests_cancels_and_closes_under_faults_end_typed_or_right(
    hf_checkpoints: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """40 seeded rounds on CPU or the simulated GPU (with or without a host cache), each: arm a
    random fault (or none) on a random expert (a device copy's issue), then generate,
    cancel a request midway, or close and reopen. Every round ends either in a typed error with
    no pinned block or in the fault-free engine's tokens and logits; nothing hangs."""
    path = hf_checkpoints.path("mixtral")
    want = await _reference(path)
    rng = random.Random(10)
    outcomes: dict[str, int] = {"right": 0, "typed error": 0, "cancelled": 0, "reopened": 0}
    setups = [*SETUPS, "sim2"]
    eng = await _open(path, rng.choice(setups))
    try:
        for _ in range(40):
            fault = rng.choice(FAULTS)
            cache: ExpertCache = eng.session.cache
            arch = eng.session.arch
            key = (rng.choice(arch.moe_layers), rng.randrange(arch.num_experts))
            if fault == "callback":
                insert = cache.policy.on_insert

                def broken(k: ExpertKey, key: ExpertKey = key, insert: Any = insert) -> None:
                    if k == key:
                        raise RuntimeError("injected")
                    insert(k)

                monkeypatch.setattr(cache.policy, "on_insert", broken)
            elif fault is not None and isinstance(cache.source, HomeSource):  # loads are device copies
                eng.session.transfers.engine.add_test_fault(
                    "delay" if fault == "delay" else "panic", op="copy", skip=rng.randrange(4),
                    count=rng.choice((0, 1, 2)), delay=0.05,
                )
            elif fault is not None:
                source = _store_source(eng)
                eng.session.transfers.engine.add_test_fault(
                    fault, file_id=source.file_id, offset=source.store.offset(*key) + rng.randrange(source.store.blob_size),
                    skip=rng.randrange(2), count=rng.choice((0, 1, 2)), delay=0.05,
                )
            action, i = rng.choice(("generate", "generate", "cancel", "close")), rng.randrange(len(PROMPTS))
            if action == "close":
                await asyncio.wait_for(eng.aclose(), 10)
                eng = await _open(path, rng.choice(setups))
                outcomes["reopened"] += 1
            elif action == "cancel":
                task = asyncio.ensure_future(eng.generate(PROMPTS[i], max_new_tokens=NEW_TOKENS))
                await asyncio.sleep(rng.uniform(0, 0.03))
                task.cancel()
                try:
                    await asyncio.wait_for(task, 30)
                except (asyncio.CancelledError, MoeflowError):
                    outcomes["cancelled"] += 1
                else:
                    outcomes["right"] += 1  # finished before the cancel
                    assert task.result().tokens == want[i][0]
            else:
                try:
                    got = await _outputs(eng, [i])
                except MoeflowError as error:
                    _check_named(error, eng, None)
                    outcomes["typed error"] += 1
                else:
                    assert_equal(got, want)
                    outcomes["right"] += 1
            assert _pinned(eng) == 0
            eng.session.transfers.engine.clear_test_faults()
            monkeypatch.undo()
        assert_equal(await _outputs(eng), want)  # the engine the run ends with still answers right
    finally:
        await asyncio.wait_for(eng.aclose(), 10)
    assert outcomes["typed error"] > 0 and outcomes["right"] > 0 and outcomes["cancelled"] > 0, outcomes


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_a_guess_whose_load_fails_under_a_layer_waiting_for_it_is_loaded_again(hf_checkpoints: Any) -> None:
    # A layer that finds its expert being prefetched waits for that load; when it fails, the
    # layer loads the expert itself, and only that load's failure would be the request's (a
    # guess made for an earlier request never fails a later one).
    from moeflow import _core
    from moeflow.memory.entries import PrefetchPlan

    path = hf_checkpoints.path("mixtral")
    eng = await _open(path, "cpu")
    try:
        source, layer, expert = _store_source(eng), eng.session.arch.moe_layers[0], 1
        base, size = source.store.offset(layer, expert), eng.plan.block_bytes
        transfers = eng.session.transfers.engine
        # the guess's first part waits, its last fails: the layer starts waiting on it meanwhile
        transfers.add_test_fault("delay", file_id=source.file_id, offset=base + 100, delay=0.3)
        transfers.add_test_fault("errno", file_id=source.file_id, offset=base + size - 100)

        async def guess_then_need() -> tuple[int, int]:
            cache = eng.session.cache
            cache.apply(PrefetchPlan(loads=[((layer, expert), _core.PRIORITY_PREFETCH)]))
            fetch = cache.fetch(layer, [expert])
            try:
                fetch.start()  # finds the guess in flight, and waits on it
                item = await asyncio.wait_for(fetch.next(), 30)
                assert item is not None and item[0] == expert
                fetch.release(expert)
            finally:
                fetch.close()
            return cache.counters.load_errors, transfers.test_fault_hits()

        errors, hits = await eng.call(guess_then_need)
        assert errors == 1 and hits == 2  # the guess failed; the layer's own load did not
        assert _pinned(eng) == 0
        assert_equal(await _outputs(eng, [0]), {0: (await _reference(path))[0]})
    finally:
        await asyncio.wait_for(eng.aclose(), 10)
