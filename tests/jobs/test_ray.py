"""Ray Data: MoeflowPredictor over 16 prompts on a local Ray instance equals `moeflow batch`'s results."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from moeflow import Engine
from moeflow.jobs import run_jobs
from tests.conftest import HFCheckpoints

ray = pytest.importorskip("ray")


@pytest.mark.timeout(300)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own, inside ray.data
def test_ray_map_batches_equals_the_job_file_run(hf_checkpoints: HFCheckpoints, tmp_path: Path) -> None:
    from moeflow.integrations.ray import MoeflowPredictor
    from moeflow.integrations.ray import main as ray_main

    path = hf_checkpoints.path("olmoe")
    rows = [{"id": f"r{i}", "prompt": [3 + i, 9, 4 + 2 * i], "max_new_tokens": 4 + i % 3} for i in range(16)]
    rows[5]["temperature"], rows[5]["seed"] = 0.9, 7
    rows[9]["max_new_tokens"] = 0  # refused: an error in its row, the others still run
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))

    async def batch() -> dict[str, list[int] | None]:
        async with Engine.open(path, device="cpu", expert_budget="50%") as eng:
            await run_jobs(eng, inp, tmp_path / "out.jsonl", concurrency=4)
        lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
        return {r["id"]: None if "error" in r else r["tokens"] for r in lines}

    want = asyncio.run(batch())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2])}})
    try:
        ds = ray.data.read_json(str(inp)).map_batches(
            MoeflowPredictor, fn_constructor_args=(str(path),),
            fn_constructor_kwargs={"device": "cpu", "expert_budget": "50%"},
            compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5, batch_size=4)  # 2 engines and the reader fit
        got_rows = ds.take_all()
        out_dir = tmp_path / "ray-out"  # the documented script, on the same cluster
        assert ray_main([str(path), "--input", str(inp), "--output", str(out_dir), "--actors", "2", "--num-cpus", "0.5",
                         "--batch-size", "4", "--device", "cpu", "--expert-budget", "50%"]) == 0
        written = [json.loads(x) for f in sorted(out_dir.glob("*.json*")) for x in f.read_text().splitlines()]
    finally:
        ray.shutdown()
    got = {r["id"]: None if r["error"] else list(r["tokens"]) for r in got_rows}
    assert got == want
    assert want["r9"] is None and "max_new_tokens" in next(r["error"] for r in got_rows if r["id"] == "r9")
    assert all(r["prompt_tokens"] == 3 for r in got_rows if not r["error"])
    assert {r["id"]: None if r["error"] else r["tokens"] for r in written} == want
