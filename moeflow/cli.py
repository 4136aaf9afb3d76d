"""The `moeflow` command: synth, convert, verify, run, bench, batch, serve, trace, train-predictor, analyze."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moeflow import cli_batch, config
from moeflow.errors import CheckpointError, MoeflowError


def _common_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine options; defaults come from EngineConfig (an option left out is not passed)."""
    p.add_argument("model", help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--expert-budget", default=None, help="fast-tier bytes for experts: '512MiB', '2GiB', '25%%'")
    p.add_argument("--device", default=None, choices=config.DEVICES,
                   help="cpu, cuda, auto, or sim: the simulated GPU (a test device: the GPU orchestration on the CPU)")
    p.add_argument("--sim-bandwidth-gbps", type=float, default=None, help="device=sim: its copy engine's GB/s")
    p.add_argument("--sim-latency-us", type=float, default=None, help="device=sim: latency of each copy, us")
    p.add_argument("--prefetch", default=None, choices=config.PREFETCHERS, help="expert predictor (default auto)")
    p.add_argument("--policy", default=None, choices=config.POLICIES, help="cache eviction policy (default lru)")
    p.add_argument("--dtype", default=None, choices=config.DTYPE_NAMES, help="compute dtype")
    p.add_argument("--direct-io", default=None, choices=config.DIRECT_IO, help="O_DIRECT store reads")
    p.add_argument("--store-dir", default=None, help="where the expert store lives (default DIR/.moeflow)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--precision", default=None, help="run experts from this store precision (e.g. int4)")
    p.add_argument("--miss-precision", default=None, help="HOBBIT: low-precision copies on unimportant misses")


def _engine_options(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "expert_budget": args.expert_budget,
        "device": args.device,
        "prefetch": args.prefetch,
        "policy": args.policy,
        "dtype": args.dtype,
        "direct_io": args.direct_io,
        "store_dir": args.store_dir,
        "threads": args.threads,
        "precision": args.precision,
        "miss_precision": args.miss_precision,
        "sim_bandwidth_gbps": args.sim_bandwidth_gbps,
        "sim_latency_us": args.sim_latency_us,
    }
    return {**{k: v for k, v in given.items() if v is not None}, "progress": not getattr(args, "json", False)}


def _prompt(args: argparse.Namespace) -> str | list[int]:
    if args.prompt_ids is not None:
        try:
            return [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"moeflow: --prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
    if args.prompt is None:
        raise SystemExit("moeflow: give --prompt TEXT or --prompt-ids 1,2,3")
    return str(args.prompt)


def _existing_checkpoint(out: Path) -> list[str]:
    """Files of a checkpoint already in `out` that synth would overwrite."""
    if not out.is_dir():
        return []
    names = ("config.json", "model.safetensors.index.json", "tokenizer.json", "generation_config.json")
    return sorted([n for n in names if (out / n).exists()] + [p.name for p in out.glob("*.safetensors")])


def cmd_synth(args: argparse.Namespace) -> int:
    from moeflow.models.synth import synthesize

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {args.out}: is a file, not a folder", path=str(out))
    existing = _existing_checkpoint(out)
    if existing and not args.force:
        raise CheckpointError(
            f"--out {args.out}: already holds a checkpoint ({', '.join(existing[:4])}"
            f"{', ...' if len(existing) > 4 else ''}); pass --force to overwrite it or choose another folder",
            path=str(out),
        )
    dtype = config.compute_dtypes().get(args.dtype or "")
    arch = synthesize(args.out, args.arch, args.size, dtype=dtype, seed=args.seed, progress=not args.quiet)
    print(f"wrote {arch.family} ({args.size}) to {args.out}: {arch.num_layers} layers, "
          f"{arch.num_experts} experts x {len(arch.moe_layers)} MoE layers, top-{arch.top_k}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from moeflow.models import Checkpoint, parse_arch
    from moeflow.store import codec_for, open_or_convert, store_root
    from moeflow.store.layout import DTYPE_NAMES

    ckpt = Checkpoint(args.model)
    arch = parse_arch(ckpt)
    precisions = args.precision.split(",") if args.precision else [DTYPE_NAMES[arch.dtype]]
    root = store_root(Path(args.model), args.store_dir)
    for precision in precisions:
        started = time.perf_counter()
        store = open_or_convert(
            ckpt, arch, codec_for(precision.strip(), args.group_size), root,
            mode="rebuild" if args.force else "auto", progress=True,
        )
        print(f"{store.path}: {len(store.manifest.crc32)} experts, {store.blob_size} bytes each "
              f"({time.perf_counter() - started:.1f}s)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from moeflow.models import Checkpoint, parse_arch
    from moeflow.store import codec_for, store_root
    from moeflow.store.store import MANIFEST
    from moeflow.store.verify import open_for_verify, verify_store

    ckpt = Checkpoint(args.model)
    arch = parse_arch(ckpt)
    root = store_root(Path(args.model), args.store_dir)
    if args.precision:
        folders = [root / p.strip() for p in args.precision.split(",")]
    else:
        folders = sorted(p.parent for p in root.glob(f"*/{MANIFEST}")) if root.is_dir() else []
    if not folders:
        raise CheckpointError(f"{root}: no expert store to verify; build one with `moeflow convert {args.model}`")
    ok = True
    for folder in folders:
        store = open_for_verify(folder, arch, codec_for(folder.name))
        report = verify_store(ckpt, arch, codec_for(folder.name), store)
        print("\n".join(report.lines()))
        ok = ok and report.ok
    if not ok:
        print("moeflow: verify: the store does not match; rebuild it with `moeflow convert --force`", file=sys.stderr)
    return 0 if ok else 1


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from moeflow.api import Engine

    async with Engine.open(args.model, **_engine_options(args)) as eng:
        res = await eng.generate(
            _prompt(args),
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_at_eos=not args.ignore_eos,
        )
        return {
            "tokens": res.tokens,
            **({"text": res.text} if res.text is not None else {}),
            "prompt_tokens": len(res.prompt_tokens),
            "finish_reason": res.finish_reason,
            "request": res.stats.as_dict(),
            "stats": eng.stats().as_dict(),
        }


def cmd_run(args: argparse.Namespace) -> int:
    out = asyncio.run(_run(args))
    if args.json:
        print(json.dumps(out))
    else:
        print(out.get("text", " ".join(map(str, out["tokens"]))))
        r = out["request"]
        print(f"[{len(out['tokens'])} tokens, {r['decode_tokens_per_second']:.2f} tok/s decode, "
              f"hit rate {r['hit_rate']:.2f}, stall {r['stall_seconds']:.3f}s]", file=sys.stderr)
    return 0


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from moeflow.api import Engine

    async with Engine.open(args.model, **_engine_options(args)) as eng:
        prompt = [(7 * i + 3) % eng.session.arch.vocab_size for i in range(args.prompt_len)]
        await eng.generate(prompt, 2, stop_at_eos=False)  # warm-up: page in code paths
        res = await eng.generate(prompt, args.max_new_tokens, stop_at_eos=False)
        s = res.stats
        return {
            "model": str(args.model),
            "expert_budget": args.expert_budget,
            "budget_bytes": eng.plan.budget_bytes,
            "expert_slots": eng.plan.slots,
            "experts_total": eng.plan.experts_total,
            "prompt_tokens": args.prompt_len,
            "new_tokens": len(res.tokens),
            "decode_tokens_per_second": s["decode_tokens_per_second"],
            "prefill_seconds": s["prefill_seconds"],
            "hit_rate": s["hit_rate"],
            "bytes_loaded_per_token": s["bytes_loaded_per_token"],
            "stall_seconds_per_token": s["stall_seconds_per_token"],
            "stats": eng.stats().as_dict(),
        }


def cmd_bench(args: argparse.Namespace) -> int:
    out = asyncio.run(_bench(args))
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            if k != "stats":
                print(f"{k:>28}: {v}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Check every argument, then load the model and serve it (`moeflow.serve.server`)."""
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"moeflow: --port {args.port}: must be in 0..65535")
    if args.max_queue is not None and args.max_queue < 1:
        raise SystemExit(f"moeflow: --max-queue {args.max_queue}: must be >= 1")
    if args.drain_seconds < 0:
        raise SystemExit(f"moeflow: --drain-seconds {args.drain_seconds}: must be >= 0")
    if not (Path(args.model) / "config.json").is_file():
        raise CheckpointError(f"{args.model}: no config.json there; give a checkpoint directory", path=args.model)
    try:
        import uvicorn  # noqa: F401 -- fail before loading the model
        from moeflow.serve.server import serve
    except ImportError as e:
        raise SystemExit(f"moeflow: serve needs the serve extra ({e}): pip install 'moeflow[serve]'") from None
    from moeflow.api import Engine

    engine = Engine.open(args.model, **_engine_options(args))
    asyncio.run(serve(engine, host=args.host, port=args.port, model_name=args.model_name,
                      max_queue=args.max_queue, drain_seconds=args.drain_seconds))
    return 0


async def _trace_all(args: argparse.Namespace) -> tuple[Any, list[Any], int]:
    from moeflow.scheduling.traces import TraceHeader, iter_prompts
    from moeflow.api import Engine
    from moeflow.session import model_signature

    options = {**_engine_options(args), "prefetch": "none", "progress": False}
    async with Engine.open(args.model, **options) as eng:
        session = eng.session
        header = TraceHeader(
            model_signature(session.checkpoint, session.arch),
            session.arch.moe_layers,
            session.arch.num_experts,
            session.arch.top_k,
        )
        prompts = list(iter_prompts(args.prompts))
        if not prompts:
            raise SystemExit(f"moeflow: {args.prompts}: no prompts")
        from tqdm import tqdm

        traces = []
        for text in tqdm(prompts, desc="tracing", unit="prompt", disable=getattr(args, "json", False)):
            ids = eng.encode(text) if session.tokenizer is not None else [int(x) for x in text.split(",")]
            traces.append(await eng.trace(ids[: args.max_prompt_tokens], args.max_new_tokens))
        return header, traces, session.plan.block_bytes


def cmd_trace(args: argparse.Namespace) -> int:
    from moeflow.scheduling.traces import write_trace

    header, traces, _ = asyncio.run(_trace_all(args))
    write_trace(args.out, header, traces)
    tokens = sum(len(t.prompt) + len(t.decode) for t in traces)
    print(f"wrote {len(traces)} routing traces ({tokens} tokens) to {args.out}")
    return 0


def cmd_train_predictor(args: argparse.Namespace) -> int:
    from moeflow.scheduling.traces import read_trace
    from moeflow.models import Checkpoint, parse_arch
    from moeflow.scheduling import expertflow
    from moeflow.session import model_signature

    ckpt = Checkpoint(args.model)
    arch = parse_arch(ckpt)
    signature = model_signature(ckpt, arch)
    traces = []
    header = None
    for path in args.traces:
        header, seqs = read_trace(path)
        if header.model != signature:
            raise SystemExit(f"moeflow: {path}: traces of model {header.model!r}, not {signature!r}")
        traces.extend(seqs)
    assert header is not None
    model, metrics = expertflow.train(traces, header, arch.vocab_size, epochs=args.epochs, seed=args.seed)
    out = Path(args.out or args.model)
    saved = expertflow.save(model, out, metrics)
    print(json.dumps({"saved": str(saved), "sequences": len(traces), **metrics}))
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from moeflow.analysis.advisor import analyze, plot, summary

    header, traces, block_bytes = asyncio.run(_trace_all(args))
    reports = analyze(header, traces)
    result = summary(header, reports, block_bytes)
    png = plot(reports, header.top_k, args.plot, f"{Path(args.model).name}: hit rate vs cache size")
    result["plot"] = str(png)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'layer':>6} " + " ".join(f"SRP{s:<4}" for s in (4, 16, 64, 256)) + "  flattens at")
    for layer in result["layers"]:
        srps = " ".join(
            f"{v:<7.3f}" if (v := layer["srp"][str(s)]) is not None else "n/a    " for s in (4, 16, 64, 256)
        )
        print(f"{layer['layer']:>6} {srps}  {layer['flattens_at']} experts")
    from moeflow.config import format_bytes

    print(f"recommended budget: {result['recommended_experts']} experts = "
          f"{format_bytes(result['recommended_budget_bytes'])} ({result['recommended_fraction']:.0%} of all experts)")
    print(f"plot: {png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moeflow import __version__

    parser = argparse.ArgumentParser(prog="moeflow", description="Run MoE checkpoints under an expert memory budget.")
    parser.add_argument("--version", action="version", version=f"moeflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a Hub-format checkpoint with random weights")
    p.add_argument("--arch", required=True, help="mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3")
    p.add_argument("--size", default="tiny", choices=("tiny", "small"))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default=None, choices=config.DTYPE_NAMES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--force", action="store_true", help="overwrite a checkpoint already in --out")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("convert", help="build (or check) the expert store of a checkpoint")
    p.add_argument("model")
    p.add_argument("--precision", default=None,
                   help="comma-separated store precisions: bfloat16, float16, float32, int8, int4, int2 "
                        "(a group size may be given as int4-g64; default: the checkpoint's dtype)")
    p.add_argument("--group-size", type=int, default=None, help="quantization group size (default 64; int2: 32)")
    p.add_argument("--store-dir", default=None)
    p.add_argument("--force", action="store_true", help="rebuild even when a valid store exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify", help="check every expert of the store against its manifest and the checkpoint")
    p.add_argument("model")
    p.add_argument("--precision", default=None, help="comma-separated store precisions (default: every store)")
    p.add_argument("--store-dir", default=None)
    p.set_defaults(func=cmd_verify)

    for name, func, help_ in (("run", cmd_run, "generate from a prompt"), ("bench", cmd_bench, "measure decode speed")):
        p = sub.add_parser(name, help=help_)
        _common_engine_args(p)
        p.add_argument("--max-new-tokens", type=int, default=32)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "run":
            p.add_argument("--prompt", default=None, help="prompt text (needs tokenizer.json)")
            p.add_argument("--prompt-ids", default=None, help="prompt token ids, e.g. 1,2,3")
            p.add_argument("--temperature", type=float, default=0.0)
            p.add_argument("--top-k", type=int, default=None)
            p.add_argument("--top-p", type=float, default=None)
            p.add_argument("--seed", type=int, default=None)
            p.add_argument("--ignore-eos", action="store_true")
        else:
            p.add_argument("--prompt-len", type=int, default=32)
        p.set_defaults(func=func)

    for name, func, help_ in (
        ("trace", cmd_trace, "record routing paths of prompts (for predictors and the advisor)"),
        ("analyze", cmd_analyze, "routing locality (SRP, SCH) and a recommended expert budget"),
    ):
        p = sub.add_parser(name, help=help_)
        _common_engine_args(p)
        p.add_argument("--prompts", required=True, help="text file: one prompt per line (or blank-line separated)")
        p.add_argument("--max-new-tokens", type=int, default=64)
        p.add_argument("--max-prompt-tokens", type=int, default=256)
        if name == "trace":
            p.add_argument("--out", required=True, help="trace file to write (JSON lines)")
        else:
            p.add_argument("--plot", default="locality.png", help="PNG to write")
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    cli_batch.add_parser(sub, _common_engine_args, _engine_options)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra)")
    _common_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the folder name)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="completion requests in flight beyond which new ones get 503 (default: no limit)")
    p.add_argument("--drain-seconds", type=int, default=30,
                   help="on SIGTERM, how long in-flight requests may finish before they are cancelled (default 30)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train-predictor", help="train the routing-path predictor on traces")
    p.add_argument("model")
    p.add_argument("--traces", nargs="+", required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory to save into (default: beside the model)")
    p.set_defaults(func=cmd_train_predictor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MoeflowError as e:
        print(f"moeflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
