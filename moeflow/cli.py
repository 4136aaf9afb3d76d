"""The `moeflow` command: synth, convert, verify, run, bench, batch, serve, trace, train-predictor, analyze."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moeflow import cli_batch, cli_tune, config
from moeflow.cli_checks import (
    MissingExtra,
    at_least,
    checkpoint_dir,
    engine_defaults,
    engine_options,
    within,
    writable_dir,
)
from moeflow.cli_generate import cmd_bench, cmd_run
from moeflow.cli_routing import cmd_analyze, cmd_trace, cmd_train_predictor
from moeflow.errors import CheckpointError, ConfigError, MoeflowError, StoreError


class _Help(argparse.HelpFormatter):
    """Help that shows every option's default: argparse's own "(default: X)" where the default is
    a value, nothing where it is None or a switch (their help says what leaving them out means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or action.required:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


def _common_engine_args(p: argparse.ArgumentParser, *, budget_default: str | None = None) -> None:
    """Engine options; defaults come from EngineConfig (an option left out is not passed)."""
    d = {name: value.replace("%", "%%") for name, value in engine_defaults().items()}  # help text is %-formatted
    p.add_argument("model", help="checkpoint directory (config.json + *.safetensors), or a Hugging Face repo id "
                                 "in the local Hugging Face cache")
    p.add_argument("--expert-budget", default=budget_default,
                   help="fast-tier memory for experts: 'auto' (what the device has free, less --memory-reserve), "
                        "'512MiB', '2GiB', '25%%'" + ("" if budget_default else f" (default: {d['expert_budget']})"))
    p.add_argument("--memory-reserve", default=None,
                   help="with --expert-budget auto: memory kept for the KV cache and activations "
                        "(default: 10%% of free memory, at least 1 GiB)")
    p.add_argument("--kv-budget", default=None, help="bytes of KV cache for all requests at once (default: no bound; "
                                                     "with --expert-budget auto, 3/4 of the reserve)")
    p.add_argument("--device", default=None, choices=config.DEVICES,
                   help=f"cpu, cuda, auto, or sim: the simulated GPU (a test device) (default: {d['device']})")
    p.add_argument("--sim-bandwidth-gbps", type=float, default=None,
                   help=f"device=sim: its copy engine's GB/s (default: {d['sim_bandwidth_gbps']})")
    p.add_argument("--sim-latency-us", type=float, default=None,
                   help=f"device=sim: latency of each copy, us (default: {d['sim_latency_us']})")
    p.add_argument("--prefetch", default=None, choices=config.PREFETCHERS,
                   help=f"expert predictor (default: {d['prefetch']}: the trained predictor when present, "
                        "else gate-lookahead)")
    p.add_argument("--policy", default=None, choices=config.POLICIES,
                   help=f"cache eviction policy (default: {d['policy']})")
    p.add_argument("--dtype", default=None, choices=config.DTYPE_NAMES,
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--direct-io", default=None, choices=config.DIRECT_IO,
                   help=f"O_DIRECT store reads (default: {d['direct_io']})")
    p.add_argument("--store-dir", default=None,
                   help="where the expert store lives (default: DIR/.moeflow, or the user cache where DIR is "
                        "read-only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--precision", default=None,
                   help="run experts from this store precision, e.g. int4 (default: the compute dtype)")
    p.add_argument("--miss-precision", default=None,
                   help="HOBBIT: low-precision copies on unimportant misses, e.g. int4 (default: off)")
    p.add_argument("--miss-compute", default=None, choices=config.MISS_COMPUTE,
                   help="GPU/sim: where a missing expert runs: copy (wait for it), cpu (compute it on the CPU from "
                        f"its pinned host copy), auto (a cost model picks per expert) (default: {d['miss_compute']})")
    p.add_argument("--cpu-layers", default=None, type=lambda v: int(v) if v.strip().isdigit() else v,
                   help="GPU/sim: MoE layers whose experts always run on the CPU: N (the first N, as llama.cpp's "
                        "--n-cpu-moe) or layer indices such as '0-3,7' (one index: '5-5') (default: none)")


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
    if args.quant == "fp8":  # as DeepSeek-V3 / Qwen3-FP8 ship: e4m3 linear weights, 128x128 block scales
        from moeflow.store.fp8 import quantize_checkpoint

        quantize_checkpoint(args.out)
    print(f"wrote {arch.family} ({args.size}) to {args.out}: {arch.num_layers} layers, "
          f"{arch.num_experts} experts x {len(arch.moe_layers)} MoE layers, top-{arch.top_k}")
    return 0


def _precisions(args: argparse.Namespace) -> list[str] | None:
    """The --precision list, each name checked now (ConfigError naming it) before the checkpoint is read."""
    if not args.precision:
        return None
    from moeflow.store.codecs import codec_for

    names = [p.strip() for p in args.precision.split(",") if p.strip()]
    for name in names:
        try:
            codec_for(name, getattr(args, "group_size", None))
        except ConfigError as e:
            raise ConfigError(f"--precision {name!r}: {e}") from e
    return names


def cmd_convert(args: argparse.Namespace) -> int:
    at_least(args, "group_size", 1)
    precisions = _precisions(args)
    if args.store_dir:
        writable_dir("--store-dir", args.store_dir)
    path = checkpoint_dir(args.model)
    from moeflow.models import Checkpoint, parse_arch
    from moeflow.store import codec_for, open_or_convert, store_root
    from moeflow.store.fp8 import native_precision
    from moeflow.store import mxfp4
    from moeflow.store.layout import DTYPE_NAMES

    ckpt = Checkpoint(path)
    arch = parse_arch(ckpt)
    root = store_root(path, args.store_dir)
    if not precisions and mxfp4.native_precision(ckpt):  # gpt-oss's MXFP4 experts stay MXFP4
        precisions = ["mxfp4"]
    for precision in precisions or [native_precision(ckpt) or DTYPE_NAMES[arch.dtype]]:
        started = time.perf_counter()
        store = open_or_convert(
            ckpt, arch, codec_for(precision, args.group_size), root,
            mode="rebuild" if args.force else "auto", progress=True,
        )
        print(f"{store.path}: {len(store.manifest.crc32)} experts, {store.blob_size} bytes each "
              f"({time.perf_counter() - started:.1f}s)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every store matches, 1 when one does not (or cannot be checked)."""
    precisions = _precisions(args)
    path = checkpoint_dir(args.model)
    from moeflow.models import Checkpoint, parse_arch
    from moeflow.store import codec_for, store_root
    from moeflow.store.store import MANIFEST
    from moeflow.store.verify import open_for_verify, verify_store

    ckpt = Checkpoint(path)
    arch = parse_arch(ckpt)
    root = store_root(path, args.store_dir)
    if precisions:
        folders = [root / p for p in precisions]
    else:
        folders = sorted(p.parent for p in root.glob(f"*/{MANIFEST}")) if root.is_dir() else []
    if not folders:
        raise StoreError(f"{root}: no expert store to verify; build one with `moeflow convert {args.model}`",
                         path=str(root))
    ok = True
    for folder in folders:
        store = open_for_verify(folder, arch, codec_for(folder.name))
        report = verify_store(ckpt, arch, codec_for(folder.name), store)
        print("\n".join(report.lines()))
        ok = ok and report.ok
    if not ok:
        print("moeflow: error: the store does not match; rebuild it with `moeflow convert --force`", file=sys.stderr)
    return 0 if ok else 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Check every argument, then load the model and serve it (`moeflow.serve.server`)."""
    within(args, "port", 0, 65535)
    at_least(args, "max_queue", 1)
    at_least(args, "drain_seconds", 0)
    options = engine_options(args)
    try:
        import uvicorn  # noqa: F401 -- fail before loading the model
    except ImportError as e:
        raise MissingExtra(f"serve needs the serve extra ({e}): pip install 'moeflow[serve]'") from None
    path = checkpoint_dir(args.model)
    from moeflow.api import Engine
    from moeflow.serve.server import serve

    # A Hub repo id is what clients know the model by (its snapshot folder is a commit hash).
    name = args.model_name or (None if Path(args.model).is_dir() else args.model)
    engine = Engine.open(path, **options)
    asyncio.run(serve(engine, host=args.host, port=args.port, model_name=name,
                      max_queue=args.max_queue, drain_seconds=args.drain_seconds))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from moeflow import __version__

    parser = argparse.ArgumentParser(prog="moeflow", description="Run MoE checkpoints under an expert memory budget.",
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"moeflow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=kw.pop("description", help_), formatter_class=_Help, **kw)

    p = command("synth", "write a Hub-format checkpoint with random weights")
    p.add_argument("--arch", required=True, help="mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3")
    p.add_argument("--size", default="tiny", choices=("tiny", "small"), help="model size")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default=None, choices=config.DTYPE_NAMES, help="weight dtype (default: float32 for tiny, bfloat16 for small)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--force", action="store_true", help="overwrite a checkpoint already in --out")
    p.add_argument("--quant", default=None, choices=("fp8",),
                   help="fp8: write it as the FP8 releases are (e4m3 weights, 128x128 block scales) "
                        "(default: the family's published layout: float weights, MXFP4 experts for gpt_oss)")
    p.set_defaults(func=cmd_synth)

    p = command("convert", "build (or check) the expert store of a checkpoint")
    p.add_argument("model", help="checkpoint directory, or a Hugging Face repo id in the local cache")
    p.add_argument("--precision", default=None,
                   help="comma-separated store precisions: bfloat16, float16, float32, int8, int4, int2 "
                        "(a group size may be given as int4-g64; default: the checkpoint's dtype)")
    p.add_argument("--group-size", type=int, default=None, help="quantization group size (default: 64; int2: 32)")
    p.add_argument("--store-dir", default=None, help="where the expert store goes (default: DIR/.moeflow)")
    p.add_argument("--force", action="store_true", help="rebuild even when a valid store exists")
    p.set_defaults(func=cmd_convert)

    p = command("verify", "check every expert of the store against its manifest and the checkpoint")
    p.add_argument("model", help="checkpoint directory, or a Hugging Face repo id in the local cache")
    p.add_argument("--precision", default=None, help="comma-separated store precisions (default: every store)")
    p.add_argument("--store-dir", default=None, help="where the expert store is (default: DIR/.moeflow)")
    p.set_defaults(func=cmd_verify)

    p = command("run", "generate from a prompt, streaming the text as it comes")
    _common_engine_args(p)
    p.add_argument("--prompt", default=None, help="prompt text, needs tokenizer.json (required unless --prompt-ids)")
    p.add_argument("--prompt-ids", default=None, help="prompt token ids, e.g. 1,2,3 (required unless --prompt)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most")
    model_default = "(default: the checkpoint's generation_config.json, else {})"
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy " + model_default.format("0"))
    p.add_argument("--top-k", type=int, default=None,
                   help="sample from the k likeliest tokens " + model_default.format("all"))
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] " + model_default.format(1))
    p.add_argument("--min-p", type=float, default=None,
                   help="drop tokens below this fraction of the likeliest one's probability, in [0, 1] "
                        + model_default.format("off"))
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 1 discourages repeating prompt and output tokens " + model_default.format("1: off"))
    p.add_argument("--presence-penalty", type=float, default=None,
                   help="OpenAI's, in [-2, 2], on tokens already generated (default: 0)")
    p.add_argument("--frequency-penalty", type=float, default=None,
                   help="OpenAI's, in [-2, 2], by how often a token was generated (default: 0)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the text before this string (repeatable; default: none)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    p.add_argument("--json", action="store_true", help="no streaming: print one JSON object at the end")
    p.set_defaults(func=cmd_run)

    p = command("bench", "prefill and decode tokens/s, repeated, as mean ± sd (llama-bench style)")
    _common_engine_args(p)
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (test ppN)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generated tokens (test tgN)")
    p.add_argument("--repetitions", "-r", type=int, default=3, help="measured runs, after one warm-up run")
    p.add_argument("--json", action="store_true", help="print one JSON object: every run, mean and sd")
    p.set_defaults(func=cmd_bench)

    prompts_help = ("prompt file: .jsonl or .json = one JSON object per line with \"prompt\" (text or token ids); "
                    "any other name = plain text, one prompt per line (empty lines skipped)")
    for name, func, help_ in (
        ("trace", cmd_trace, "record routing paths of prompts (for predictors and the advisor)"),
        ("analyze", cmd_analyze, "routing locality (SRP, SCH) and a recommended --expert-budget"),
    ):
        p = command(name, help_)
        _common_engine_args(p)
        p.add_argument("--prompts", required=True, help=prompts_help)
        p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per prompt")
        p.add_argument("--max-prompt-tokens", type=int, default=256, help="prompt tokens kept per prompt")
        if name == "trace":
            p.add_argument("--out", required=True, help="trace file to write (JSON lines)")
        else:
            p.add_argument("--plot", default=None, metavar="PNG",
                           help="write a PNG of hit rate against cache size (needs matplotlib; default: no plot)")
            p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=func)

    cli_batch.add_parser(command, _common_engine_args, engine_options)
    cli_tune.add_parser(command)

    p = command("serve", "an OpenAI-compatible HTTP server (needs the serve extra)")
    _common_engine_args(p, budget_default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (default: the repo id, or the folder name)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="completion requests in flight beyond which new ones get 503 (default: no limit)")
    p.add_argument("--drain-seconds", type=int, default=30,
                   help="on SIGTERM, how long in-flight requests may finish before they are cancelled")
    p.set_defaults(func=cmd_serve)

    p = command("train-predictor", "train the routing-path predictor on traces")
    p.add_argument("model", help="checkpoint directory, or a Hugging Face repo id in the local cache")
    p.add_argument("--traces", nargs="+", required=True, help="trace files written by `moeflow trace`")
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--out", default=None, help="directory to save into (default: the model's folder)")
    p.set_defaults(func=cmd_train_predictor)
    return parser


def _os_message(e: OSError) -> str:
    """One line for an OSError: the file, then what went wrong (no traceback)."""
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}"


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done; 1 an error (bad option value, missing or unreadable file, a checkpoint or
    request refused, `verify` found a mismatch); 2 a usage error argparse found; 130 Ctrl-C."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except MoeflowError as e:
        print(f"moeflow: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"moeflow: error: {_os_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
