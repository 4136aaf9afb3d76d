"""Decode speed of moeflow against transformers, and under 50% / 25% expert budgets.

    python benches/bench_decode.py [--model DIR] [--new-tokens 32] [--prefetch gate-lookahead]

On `moeflow synth --arch mixtral --size small` (about 1.4 GB of bf16 experts; synthesized into
.artifacts/ when --model is not given), in one run:
  - transformers' generate at full budget, and moeflow at full budget: `full_budget_vs_transformers`;
  - moeflow at 50% and 25% budgets with the store read with O_DIRECT: decode tokens/s, hit rate,
    bytes loaded per token, stall seconds per token (decode steps), and the I/O bound: bytes missed
    per token divided by the disk's O_DIRECT bandwidth measured (dd) on the store file in the same run.
With --device sim, the budgeted runs use the simulated GPU (a pinned host home of every expert
behind a copy engine of --sim-bandwidth-gbps): they report bytes per load against the expert's
blob size (whole copies) and check bytes moved per second against that link (physics.py).
Prints one JSON line.

    python benches/bench_decode.py --arch glm4_moe,minimax_m2,llama4_text,phimoe [--new-tokens 32] [--rounds 3]

With --arch (issue 14), for each family given: a `small` synthesized model of that family
(.artifacts/bench-decode/<family>-small, synthesized once and reused), moeflow at full budget on the
cpu against transformers' own generate on the same weights in the same process, alternating round by
round (greedy, the same prompt, the same number of new tokens, decode steps only, wall clock up to the
delivery of each token). One JSON line per family: tokens/s of both, the ratio (goal >= 1.2x) and
whether the greedy tokens are equal. The budgeted runs and the disk measurement are not made.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeflow import Engine  # noqa: E402
from moeflow.models.synth import family_name, synthesize  # noqa: E402
from benches import bench_mxfp4, physics  # noqa: E402


def dd_bandwidth(path: Path, runs: int = 2) -> float:
    """O_DIRECT read bandwidth of `path` in bytes/s (best of `runs`)."""
    best = 0.0
    for _ in range(runs):
        out = subprocess.run(
            ["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"], capture_output=True, text=True, check=True
        ).stderr
        m = re.search(r"(\d+) bytes .* copied, ([0-9.]+) s", out)
        if m:
            best = max(best, int(m.group(1)) / float(m.group(2)))
    return best


class TransformersDecode:
    """transformers' generate on the same checkpoint; decode time = generate(n+1) - generate(1)."""

    def __init__(self, model_dir: Path, prompt: list[int]) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16,
                                                          **bench_mxfp4.hf_options(model_dir)).eval()
        self.ids = torch.tensor([prompt])
        self.tokens: list[int] = []  # the greedy tokens of the last timed generate(new_tokens + 1)

    def _timed(self, n: int) -> tuple[float, list[int]]:
        started = time.perf_counter()
        with torch.no_grad():
            out = self.model.generate(self.ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - started, out[0, self.ids.shape[1]:].tolist()

    def tokens_per_second(self, new_tokens: int) -> float:
        long, self.tokens = self._timed(new_tokens + 1)
        short, _ = self._timed(1)
        return new_tokens / max(1e-9, long - short)


async def moeflow_decode(eng: Engine, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    res = await eng.generate(prompt, new_tokens, stop_at_eos=False)
    s = res.stats
    return {  # decode steps only (the prefill step loads most experts of every layer)
        "tokens": list(res.tokens),
        "tokens_per_second": round(s["decode_tokens_per_second"], 3),
        "hit_rate": round(s["decode_hit_rate"], 4),
        "inflight_hits": s["decode_inflight_hits"],
        "misses": s["decode_misses"],
        "bytes_loaded": s["decode_bytes_loaded"],
        "decode_seconds": s["decode_seconds"],
        "bytes_loaded_per_token": round(s["decode_bytes_loaded_per_token"]),
        "stall_seconds_per_token": round(s["decode_stall_seconds_per_token"], 5),
        "overlap_fraction": round(s["decode_overlap_fraction"], 3),
        "host_syncs_per_token": round(s["host_syncs_per_token"], 2),
    }


async def full_budget_vs_transformers(
    model_dir: Path, prompt: list[int], new_tokens: int, rounds: int, compare_tokens: bool = False
) -> dict[str, Any]:
    """Both in one process, alternating round by round (the machine's memory bandwidth drifts
    over minutes); the best round of each is kept. With compare_tokens, also where the greedy
    tokens of the last round first differ, with transformers' logit margin there."""
    hf = TransformersDecode(model_dir, prompt)
    hf.tokens_per_second(2)  # warm-up
    ours: list[float] = []
    theirs: list[float] = []
    our_tokens: list[int] = []
    async with Engine.open(model_dir, device="cpu", expert_budget="100%") as eng:
        await eng.generate(prompt, 8, stop_at_eos=False)  # warm-up: every expert resident
        store = str(eng.session.store.data_path)
        for _ in range(rounds):
            theirs.append(hf.tokens_per_second(new_tokens))
            run = await moeflow_decode(eng, prompt, new_tokens)
            ours.append(run["tokens_per_second"])
            our_tokens = run["tokens"]
    # transformers' generate(new_tokens + 1) of the last round: its first new_tokens are moeflow's
    their_tokens = hf.tokens[:new_tokens]
    compared: dict[str, Any] = {}
    if compare_tokens:
        compared = token_divergence(hf.model, prompt, our_tokens, their_tokens)
    del hf
    gc.collect()
    return {"ours": max(ours), "transformers": max(theirs), "store": store,
            "ours_rounds": ours, "transformers_rounds": [round(t, 3) for t in theirs],
            "ours_tokens": our_tokens, "transformers_tokens": their_tokens, **compared}


def token_divergence(model: Any, prompt: list[int], ours: list[int], theirs: list[int]) -> dict[str, Any]:
    """The first position where the two greedy sequences differ (None: equal), and there, how far
    transformers' logit of its own token is above its logit of moeflow's (near 0: a near-tie that
    bf16 rounding can flip)."""
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if at is None and len(ours) != len(theirs):
        at = min(len(ours), len(theirs))
    out: dict[str, Any] = {"first_divergence": at, "divergence_logit_margin": None}
    if at is not None and at < min(len(ours), len(theirs)):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + theirs[:at]])).logits[0, -1].float()
        out["divergence_logit_margin"] = round(float(logits[theirs[at]] - logits[ours[at]]), 5)
        out["divergence_logit_spread"] = round(float(logits.max() - logits.min()), 5)
    return out


async def budget_run(
    model_dir: Path, prompt: list[int], new_tokens: int, rounds: int, budget: str, prefetch: str, device: str,
    sim_bandwidth_gbps: float,
) -> dict[str, Any]:
    options: dict[str, Any] = (
        {"direct_io": "require"} if device == "cpu" else {"sim_bandwidth_gbps": sim_bandwidth_gbps}
    )
    async with Engine.open(model_dir, device=device, expert_budget=budget, prefetch=prefetch, **options) as eng:
        await eng.generate(prompt, 8, stop_at_eos=False)  # warm-up
        before = eng.stats()
        runs = [await moeflow_decode(eng, prompt, new_tokens) for _ in range(rounds)]
        stats = eng.stats()
        best = max(runs, key=lambda r: r["tokens_per_second"])
        loads = stats["loads"] - before["loads"]
        landed = stats["bytes_loaded"] - before["bytes_loaded"]
        return {**best, "slots": eng.plan.slots, "experts_total": eng.plan.experts_total,
                "blob_bytes": eng.plan.block_bytes,
                # every load moves one whole expert: equal to blob_bytes, or a copy was cut short
                "bytes_per_load": round(landed / loads) if loads else 0,
                "hazards": eng.session.compute.sim.hazards if device == "sim" else None}  # type: ignore[attr-defined]


def arch_model(arch: str) -> tuple[str, Path, float | None]:
    """The family's name, its `small` model (synthesized when absent: into a .partial directory
    renamed when complete, so an interrupted synthesis is not reused) and the seconds synthesis took."""
    family = family_name(arch)
    model_dir = ROOT / ".artifacts" / "bench-decode" / f"{family}-small"
    if (model_dir / "config.json").exists():
        return family, model_dir, None
    partial = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.perf_counter()
    synthesize(partial, family, "small", progress=False)
    partial.rename(model_dir)
    return family, model_dir, round(time.perf_counter() - started, 1)


def arch_line(arch: str, prompt: list[int], new_tokens: int, rounds: int) -> dict[str, Any]:
    """Full-budget decode of a `small` model of `arch`: moeflow against transformers (issue 14)."""
    family, model_dir, synth_seconds = arch_model(arch)
    started = time.perf_counter()
    both = asyncio.run(full_budget_vs_transformers(model_dir, prompt, new_tokens, rounds, compare_tokens=True))
    ours_tokens = both["ours_tokens"]
    diverge = both["first_divergence"]
    ratio = both["ours"] / both["transformers"]
    line: dict[str, Any] = {
        "arch": family,
        "size": "small",
        "model": str(model_dir.relative_to(ROOT)),
        "device": "cpu",
        "budget": "100%",
        "prompt_len": len(prompt),
        "new_tokens": new_tokens,
        "moeflow_tokens_per_second": both["ours"],
        "transformers_tokens_per_second": round(both["transformers"], 3),
        "full_budget_vs_transformers": round(ratio, 3),
        "goal": 1.2,
        "meets_goal": ratio >= 1.2,
        "greedy_tokens_equal": diverge is None,
        "first_divergence": diverge,
        "divergence_logit_margin": both["divergence_logit_margin"],  # transformers' own token minus moeflow's
        "divergence_logit_spread": both.get("divergence_logit_spread"),  # max - min logit there, for scale
        "moeflow_tokens": ours_tokens,
        "transformers_tokens": both["transformers_tokens"],
        "rounds": {"moeflow": both["ours_rounds"], "transformers": both["transformers_rounds"]},
        "synth_seconds": synth_seconds,
        "bench_seconds": round(time.perf_counter() - started, 1),
    }
    if family == "gpt_oss":  # its MXFP4 experts: store bytes and a 25% budget against the bf16 store
        line["store_bytes_per_expert"] = bench_mxfp4.store_bytes(model_dir)
        line["quarter_budget_mxfp4_vs_bf16"] = asyncio.run(
            bench_mxfp4.quarter_budget(model_dir, prompt, new_tokens, rounds, moeflow_decode))
    if diverge is not None and diverge < len(ours_tokens) and ours_tokens[diverge] == 2:
        # transformers' min_new_tokens masks the EOS logit; moeflow (stop_at_eos=False) does not
        line["divergence_is_eos"] = True
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: synthesize a small Mixtral)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (best kept)")
    # Named, not "auto": a routing predictor left beside the model (bench_prefetch trains one)
    # would otherwise change what this benchmark measures.
    ap.add_argument("--prefetch", default="gate-lookahead",
                    help="predictor of the budgeted runs (default: the engine's default without a trained predictor)")
    ap.add_argument("--device", choices=("cpu", "sim"), default="cpu",
                    help="device of the budgeted runs: cpu (RAM over the disk) or sim (the simulated GPU)")
    ap.add_argument("--sim-bandwidth-gbps", type=float, default=25.0)
    ap.add_argument("--budgets", default="50%,25%")
    ap.add_argument("--arch", default=None,
                    help="FAMILY[,FAMILY...]: full budget against transformers on a small synthesized model of "
                         "each family, one JSON line per family (--model, --device and --budgets are not used)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.arch:
        prompt = [(31 * i + 7) % 1000 + 3 for i in range(args.prompt_len)]
        failed = False
        for arch in [a.strip() for a in args.arch.split(",") if a.strip()]:
            try:
                line = arch_line(arch, prompt, args.new_tokens, args.rounds)
            except Exception as e:  # one family's failure is reported on its line; the others still run
                line = {"arch": arch, "error": f"{type(e).__name__}: {e}"}
                failed = True
            print(json.dumps(line), flush=True)
            gc.collect()
        sys.exit(1 if failed else 0)
    model_dir = Path(args.model) if args.model else ROOT / ".artifacts" / "mixtral-small"
    if not (model_dir / "config.json").exists():
        synthesize(model_dir, "mixtral", "small", progress=False)
    prompt = [(31 * i + 7) % 1000 + 3 for i in range(args.prompt_len)]

    both = asyncio.run(full_budget_vs_transformers(model_dir, prompt, args.new_tokens, args.rounds))
    disk = dd_bandwidth(Path(both["store"]))
    result: dict[str, Any] = {
        "model": str(model_dir),
        "new_tokens": args.new_tokens,
        "transformers_tokens_per_second": round(both["transformers"], 3),
        "full_budget_tokens_per_second": both["ours"],
        "full_budget_vs_transformers": round(both["ours"] / both["transformers"], 3),
        "rounds": {"moeflow": both["ours_rounds"], "transformers": both["transformers_rounds"]},
        "disk_direct_gb_per_second": round(disk / 1e9, 3),
    }
    if args.device == "sim":
        link = physics.link_peak("sim", sim_bandwidth=args.sim_bandwidth_gbps * 1e9)
    else:
        link = disk
    result["device"] = args.device
    result["link_gb_per_second"] = round(link / 1e9, 3)
    labels = {"50%": "half", "25%": "quarter"}
    for budget in args.budgets.split(","):
        r = asyncio.run(budget_run(model_dir, prompt, args.new_tokens, args.rounds, budget, args.prefetch,
                                   args.device, args.sim_bandwidth_gbps))
        # the physics check: what decode moved over the link cannot beat the link
        physics.check_rate(f"decode at {budget}", r["bytes_loaded"], r["decode_seconds"], link)
        bound = r["bytes_loaded_per_token"] / link if link else 0.0
        result[labels.get(budget, budget)] = {
            "budget": budget,
            "prefetch": args.prefetch,
            "tokens_per_second": r["tokens_per_second"],
            "vs_full_budget": round(r["tokens_per_second"] / both["ours"], 3),
            "hit_rate": r["hit_rate"],
            "inflight_hits": r["inflight_hits"],
            "misses": r["misses"],
            "bytes_loaded_per_token": r["bytes_loaded_per_token"],
            "bytes_per_load": r["bytes_per_load"],
            "blob_bytes": r["blob_bytes"],
            "stall_seconds_per_token": r["stall_seconds_per_token"],
            "overlap_fraction": r["overlap_fraction"],
            "host_syncs_per_token": r["host_syncs_per_token"],
            "io_bound_seconds_per_token": round(bound, 5),
            "slots": r["slots"],
            "experts_total": r["experts_total"],
            "hazards": r["hazards"],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
