"""The prefetch scheduler: overlap, correction, protection, metrics, and a free event loop."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from moeflow import Engine, _core as core
from moeflow.errors import PredictorError
from moeflow.scheduling.scheduler import _Pending
from moeflow.memory.cache import EntryState
from tests.scheduling.conftest import PROMPTS


@pytest.mark.asyncio
async def test_waiting_for_an_expert_leaves_the_event_loop_free(trained_model: Path) -> None:
    async with Engine.open(trained_model, device="cpu", expert_budget="20%", prefetch="none") as eng:
        ticks = 0
        running = True

        async def ticker() -> None:
            nonlocal ticks
            while running:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        before = ticks
        res = await eng.generate(eng.encode(PROMPTS[0]), 12, stop_at_eos=False)
        running = False
        await task
        assert res.stats["misses"] > 0
        # Each miss awaited a transfer; the ticker ran while the step waited.
        assert ticks - before >= res.stats["misses"] // 2


@pytest.mark.asyncio
async def test_gate_lookahead_predicts_well_and_reports_metrics(trained_model: Path) -> None:
    async with Engine.open(trained_model, device="cpu", expert_budget="50%", prefetch="gate-lookahead") as eng:
        for p in PROMPTS[:4]:
            await eng.generate(eng.encode(p), 16, stop_at_eos=False)
        s = eng.stats()
        assert 0.0 < s["precision_1_ahead"] <= 1.0 and 0.0 < s["recall_1_ahead"] <= 1.0
        assert s["recall_1_ahead"] >= s["recall_2_ahead"] - 0.05  # nearer layers predict better
        assert s["prefetch_used"] > 0 and 0.0 <= s["overlap_fraction"] <= 1.0


@pytest.mark.asyncio
async def test_last_token_and_eam_predict_the_next_token(trained_model: Path) -> None:
    for name in ("last-token", "eam"):
        async with Engine.open(trained_model, device="cpu", expert_budget="50%", prefetch=name) as eng:
            for p in PROMPTS[:4]:
                await eng.generate(eng.encode(p), 12, stop_at_eos=False)
            s = eng.stats()
            assert s["recall_next_token"] > 0.0, name


@pytest.mark.asyncio
async def test_trained_predictor_is_loaded_and_named_in_stats(predictor_model: Path) -> None:
    async with Engine.open(predictor_model, device="cpu", expert_budget="50%") as eng:  # prefetch="auto"
        await eng.generate(eng.encode(PROMPTS[0]), 8, stop_at_eos=False)
        s = eng.stats()
        assert s["prefetch"] == "expertflow"
        assert str(s["predictor_source"]).endswith("routing_predictor.safetensors")
        assert s["recall_1_ahead"] > 0.0


@pytest.mark.asyncio
async def test_expertflow_without_a_trained_predictor_is_a_clear_error(hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PredictorError, match="moeflow train-predictor"):
        await Engine.open(hf_checkpoints.path("olmoe"), device="cpu", prefetch="expertflow")


@pytest.mark.asyncio
async def test_predictor_trained_for_another_model_is_refused(predictor_model: Path, hf_checkpoints) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(PredictorError, match="trained for model"):
        await Engine.open(hf_checkpoints.path("olmoe"), device="cpu", prefetch="expertflow",
                          predictor_dir=predictor_model)


async def _evictions(eng: Engine) -> None:
    cache = eng.session.cache
    slots = cache.capacity
    keys = [(layer, e) for layer in eng.session.arch.moe_layers for e in range(16)][: slots + 2]
    for key in keys[:slots]:
        await cache.acquire(key)  # pinned, cache full
    assert not cache.start_load(keys[slots], 1)  # everything pinned: no room, nothing evicted
    for key in keys[:slots]:
        cache.release(key)
    assert not cache.start_load(keys[slots], 1)  # all used this step: too recent to trade for a guess
    cache.begin_step()
    cache.begin_step()
    protect = set(keys[:slots])
    assert not cache.start_load(keys[slots], 1, protect)  # all protected (nearer predictions)
    assert cache.start_load(keys[slots], 1, set(keys[1:slots]))  # one unprotected victim
    assert keys[0] not in cache.entries and all(k in cache.entries for k in keys[1:slots])
    await cache.acquire(keys[slots])
    cache.release(keys[slots])


@pytest.mark.asyncio
async def test_prefetch_never_evicts_pinned_or_protected_experts(trained_model: Path) -> None:
    async with Engine.open(trained_model, device="cpu", expert_budget="20%", prefetch="none") as eng:
        await eng.call(_evictions, eng)  # the cache belongs to the engine thread


@pytest.mark.asyncio
async def test_wrong_prefetches_for_a_layer_are_cancelled_when_it_routes(trained_model: Path, tmp_path: Path) -> None:
    """With the single I/O worker busy, prefetches queue; the router's choice cancels the useless ones."""
    async with Engine.open(trained_model, device="cpu", expert_budget="50%", prefetch="none", io_workers=1) as eng:
        async def body() -> None:  # on the engine thread, which owns the cache
            s = eng.session
            blocker = tmp_path / "busy.bin"
            blocker.write_bytes(b"\0" * (256 << 20))
            big = s.transfers.register_file(str(blocker))
            arena = core.HostArena(256 << 20)
            own = core.SlabAllocator(arena, 256 << 20, slab_size=256 << 20)
            handle = own.alloc(own.add_class(256 << 20))
            busy = s.transfers.submit_read(big, 0, 256 << 20, own, handle, priority=0, direct="never")
            schedule = s.scheduler.track([1, 2, 3])
            layer = s.arch.moe_layers[1]
            wrong = [(e, 1.0) for e in range(2)]  # the next layer's guesses (prefetch_width = top_k)
            schedule.pending[layer] = _Pending(wrong, 1)
            schedule.position = 0
            schedule.started(s.cache.apply(schedule._prefetch(current=None)))
            queued = [k for k, e in s.cache.entries.items() if e.state is EntryState.LOADING]
            assert {k[1] for k in queued} == {0, 1}
            plan = schedule.on_route(layer, torch.zeros(1, s.arch.hidden_size, dtype=s.dtype), torch.tensor([[8, 9]]),
                                     {8, 9})
            assert sorted(plan.cancel) == [(layer, 0), (layer, 1)]  # the scheduler decides...
            s.cache.apply(plan)  # ...the cache does it
            assert s.cache.counters.prefetch_cancelled == 2
            assert all((layer, e) not in s.cache.entries for e in range(2))
            await busy
            own.free(handle)
            s.cache.apply(schedule.finish())

        await eng.call(body)


@pytest.mark.asyncio
async def test_a_prefetch_finished_before_its_layer_counts_as_a_hit(trained_model: Path) -> None:
    """The layer looks at completions that arrived while it computed (the event loop may not
    have run since): a prefetch that is done is a hit, not a miss with a wait."""
    import time

    from moeflow.runtime.moe import Routing, run_moe

    async with Engine.open(trained_model, device="cpu", expert_budget="50%", prefetch="none") as eng:
        async def body() -> None:  # on the engine thread, which owns the cache
            s = eng.session
            cache = s.cache
            layer = next(lay for lay in s.runner.model.layers if lay.router is not None)
            assert cache.start_load((layer.index, 3), core.PRIORITY_PREFETCH)
            entry = cache.entries[(layer.index, 3)]
            deadline = time.monotonic() + 10
            while cache.transfers.engine.pending() and time.monotonic() < deadline:
                time.sleep(0.01)  # blocking: the loop cannot drain the eventfd meanwhile
            assert entry.state is EntryState.LOADING  # not drained yet
            before = (cache.counters.hits, cache.counters.misses)
            x = torch.randn(1, s.arch.hidden_size).to(s.runner.model.dtype)
            routing = Routing.group(torch.tensor([[3]]), torch.ones(1, 1, dtype=x.dtype), [[3]], [[1.0]])
            out = await run_moe(layer, x, routing, cache)
            assert out.shape == x.shape
            assert (cache.counters.hits, cache.counters.misses) == (before[0] + 1, before[1])
            assert cache.counters.prefetch_used == 1 and eng.stats()["pinned_blocks"] == 0

        await eng.call(body)


def _spy_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int, bool]]:
    """Records, in order, each layer's routing ('route', layer, False) and each load the cache
    submits ('load', layer, speculative)."""
    from moeflow.memory.cache import ExpertCache
    from moeflow.scheduling.scheduler import SequenceSchedule

    events: list[tuple[str, int, bool]] = []
    submit, on_route = ExpertCache._submit, SequenceSchedule.on_route

    def spy_submit(self, key, priority, *, prefetched):  # type: ignore[no-untyped-def]
        events.append(("load", key[0], prefetched))
        return submit(self, key, priority, prefetched=prefetched)

    def spy_route(self, layer, ids, guess, actual):  # type: ignore[no-untyped-def]
        events.append(("route", layer, False))
        return on_route(self, layer, ids, guess, actual)

    monkeypatch.setattr(ExpertCache, "_submit", spy_submit)
    monkeypatch.setattr(SequenceSchedule, "on_route", spy_route)
    return events


@pytest.mark.asyncio
async def test_a_layers_demand_loads_go_in_before_the_guesses_for_the_next_layers(
        trained_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A device serving reads in order (a disk, a copy stream) then never makes a layer wait
    # behind a guess made at its own routing.
    events = _spy_loads(monkeypatch)
    async with Engine.open(trained_model, device="cpu", expert_budget="40%", prefetch="gate-lookahead") as eng:
        for p in PROMPTS[:3]:
            await eng.generate(eng.encode(p), 16, stop_at_eos=False)
    both = 0
    for i, (kind, layer, _) in enumerate(events):
        if kind != "route":
            continue
        end = next((j for j in range(i + 1, len(events)) if events[j][0] == "route"), len(events))
        segment = events[i + 1:end]
        demand = [j for j, (_, lay, spec) in enumerate(segment) if lay == layer and not spec]
        guesses = [j for j, (_, _, spec) in enumerate(segment) if spec]
        if demand and guesses:
            both += 1
            assert demand[0] < guesses[0], f"layer {layer}: a guess was queued before the layer's own demand load"
    assert both > 0  # the case arose


@pytest.mark.asyncio
async def test_the_gate_lookahead_prefetches_the_first_moe_layer_of_each_step(
        trained_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No hidden state precedes the first MoE layer; its guesses come from the step's tokens.
    events = _spy_loads(monkeypatch)
    async with Engine.open(trained_model, device="cpu", expert_budget="40%", prefetch="gate-lookahead") as eng:
        first = eng.session.arch.moe_layers[0]
        for p in PROMPTS[:3]:
            await eng.generate(eng.encode(p), 16, stop_at_eos=False)
        s = eng.stats()
    assert any(kind == "load" and layer == first and spec for kind, layer, spec in events)
    assert s["prefetch_used"] > 0


@pytest.mark.asyncio
async def test_a_failing_guess_load_releases_the_layers_experts(trained_model: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The guesses are issued inside the layer's own try: a load that raises there (all experts
    # resident, the path with no fetch, the common one at this budget once warm) leaves no
    # expert pinned, and the engine goes on.
    from moeflow.memory.cache import ExpertCache

    async with Engine.open(trained_model, device="cpu", expert_budget="90%", prefetch="gate-lookahead") as eng:
        ids = eng.encode(PROMPTS[0])
        want = (await eng.generate(ids, 8, stop_at_eos=False)).tokens
        real, take, resident = ExpertCache.load, ExpertCache.take_resident, [False]

        def taking(self, layer, experts):  # type: ignore[no-untyped-def]
            taken = take(self, layer, experts)
            resident[0] = taken is not None
            return taken

        def failing(self, plan):  # type: ignore[no-untyped-def]
            if resident[0]:  # issued by a layer that took all its experts resident
                raise RuntimeError("injected")
            return real(self, plan)

        monkeypatch.setattr(ExpertCache, "take_resident", taking)
        monkeypatch.setattr(ExpertCache, "load", failing)
        with pytest.raises(RuntimeError, match="injected"):
            await eng.generate(ids, 8, stop_at_eos=False)
        assert eng.session.cache.pinned_blocks() == 0
        monkeypatch.setattr(ExpertCache, "load", real)
        assert (await eng.generate(ids, 8, stop_at_eos=False)).tokens == want


@pytest.mark.asyncio
async def test_a_budget_holding_every_expert_runs_no_predictor(trained_model: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Every expert stays once loaded, so a guess could only find it there: the predictor's device
    # work and the scheduler's hooks are skipped, and the tokens are those of prefetch='none'.
    from moeflow.scheduling.predictors import _GateLookahead

    guesses: list[int] = []
    real = _GateLookahead.guess

    def counted(self, layer, x):  # type: ignore[no-untyped-def]
        guesses.append(layer)
        return real(self, layer, x)

    monkeypatch.setattr(_GateLookahead, "guess", counted)
    ids = [1, 5, 9, 14]
    async with Engine.open(trained_model, device="cpu", prefetch="none") as eng:
        want = (await eng.generate(ids, 8, stop_at_eos=False)).tokens
    async with Engine.open(trained_model, device="cpu", prefetch="gate-lookahead") as eng:
        assert not eng.session.scheduler.active
        assert (await eng.generate(ids, 8, stop_at_eos=False)).tokens == want
    assert guesses == []
    async with Engine.open(trained_model, device="cpu", expert_budget="90%", prefetch="gate-lookahead") as eng:
        assert eng.session.scheduler.active
        await eng.generate(ids, 8, stop_at_eos=False)
    assert guesses
