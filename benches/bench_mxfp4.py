"""GPT-OSS's MXFP4 lines of `bench_decode.py --arch gpt_oss` (issue 14): store bytes per expert in
MXFP4 against bf16 (goal <= 0.27x) and decode tokens/s at a 25% budget of the mxfp4 store against
the bf16 store of the same checkpoint (dequantized at convert), both engines open at once and
measured alternately, round by round, on the cpu with the store read with O_DIRECT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeflow import Engine
from moeflow.models import Checkpoint, parse_arch
from moeflow.models.mxfp4 import is_mxfp4
from moeflow.store.codecs import codec_for

GOAL = 0.27


def hf_options(model_dir: Path) -> dict[str, Any]:
    """transformers' from_pretrained options: an MXFP4 checkpoint through its dequantized path
    (the one that runs on any device; the MXFP4 kernels need the Hub's `kernels` package)."""
    if not is_mxfp4(json.loads((model_dir / "config.json").read_text())):
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def store_bytes(model_dir: Path) -> dict[str, Any]:
    """Bytes of one expert's blob in an mxfp4 and a bf16 store (what a load moves, what a slot holds)."""
    arch = parse_arch(Checkpoint(model_dir))
    sizes = {p: codec_for(p).layout(arch.hidden_size, arch.expert_intermediate, arch.swiglu).size
             for p in ("mxfp4", "bfloat16")}
    ratio = sizes["mxfp4"] / sizes["bfloat16"]
    return {"mxfp4": sizes["mxfp4"], "bfloat16": sizes["bfloat16"], "ratio": round(ratio, 4), "goal": GOAL,
            "meets_goal": ratio <= GOAL}


async def quarter_budget(model_dir: Path, prompt: list[int], new_tokens: int, rounds: int,
                         decode: Any, device: str = "cpu") -> dict[str, Any]:
    """Decode at a 25% budget, mxfp4 store against bf16 store; `decode` is bench_decode.moeflow_decode.
    device "cpu": the slots in RAM, misses read from disk with O_DIRECT; "cuda": the slots on the
    GPU, misses copied from pinned host memory (the kernels of kernels/mxfp4.cu compute)."""
    # bf16 compute for both (the small model's dtype): the bf16 store's experts are read as they are
    options: dict[str, Any] = dict(device=device, dtype="bfloat16", expert_budget="25%", prefetch="gate-lookahead")
    if device == "cpu":
        options["direct_io"] = "require"
    runs: dict[str, list[dict[str, Any]]] = {"mxfp4": [], "bfloat16": []}
    async with Engine.open(model_dir, precision="mxfp4", **options) as mx, \
            Engine.open(model_dir, precision="bfloat16", **options) as bf:
        engines = {"mxfp4": mx, "bfloat16": bf}
        for eng in engines.values():
            await eng.generate(prompt, 8, stop_at_eos=False)  # warm-up
        for _ in range(rounds):
            for name, eng in engines.items():
                runs[name].append(await decode(eng, prompt, new_tokens))
        slots = {name: eng.plan.slots for name, eng in engines.items()}
    out: dict[str, Any] = {"device": device, "budget": "25%", "prefetch": options["prefetch"]}
    for name, rs in runs.items():
        best = max(rs, key=lambda r: r["tokens_per_second"])
        out[name] = {"tokens_per_second": best["tokens_per_second"], "hit_rate": best["hit_rate"],
                     "bytes_loaded_per_token": best["bytes_loaded_per_token"],
                     "stall_seconds_per_token": best["stall_seconds_per_token"], "slots": slots[name],
                     "rounds": [r["tokens_per_second"] for r in rs]}
    out["tokens_equal"] = runs["mxfp4"][-1]["tokens"] == runs["bfloat16"][-1]["tokens"]
    out["mxfp4_vs_bfloat16"] = round(out["mxfp4"]["tokens_per_second"] / out["bfloat16"]["tokens_per_second"], 3)
    return out


def main() -> None:
    """`python benches/bench_mxfp4.py --device cuda`: the store bytes and the 25% budget line alone, on a
    device (bench_decode --arch gpt_oss measures them on the cpu beside transformers)."""
    import argparse
    import asyncio
    import sys
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benches.bench_decode import moeflow_decode
    from moeflow.models.synth import synthesize

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--model", default="/tmp/gpt_oss-small", help="an MXFP4 GPT-OSS (synthesized small when absent)")
    ap.add_argument("--device", default="cuda", choices=("cpu", "cuda"))
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = Path(args.model)
    if not (model / "config.json").exists():
        synthesize(model, "gpt_oss", "small", progress=False, device=args.device)
    prompt = [(31 * i + 7) % 1000 + 3 for i in range(32)]
    started = time.perf_counter()
    line: dict[str, Any] = {"arch": "gpt_oss", "model": str(model), "store_bytes_per_expert": store_bytes(model)}
    line["quarter_budget_mxfp4_vs_bf16"] = asyncio.run(
        quarter_budget(model, prompt, args.new_tokens, args.rounds, moeflow_decode, device=args.device))
    line["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
