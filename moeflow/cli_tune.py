"""`moeflow tune-kernels MODEL`: measure, on this GPU, which kernel path computes a model's quantized
experts fastest at each row count, into the table a GPU engine reads at open (runtime/kernel_choice.py)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moeflow.cli_checks import at_least, checkpoint_dir
from moeflow.errors import ConfigError, CudaUnavailable

DTYPE_CHOICES = ("bfloat16", "float16")


def add_parser(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add `tune-kernels`; `command(name, help, description=...)` makes a subcommand's parser."""
    p = command("tune-kernels", "time this GPU's kernel paths for a model's quantized experts (the table runs read)",
                description="Times every GPU path of a min-max quantized expert (moe_decode.cu, grouped_mma.cu, "
                            "dequant.cu + torch's SiLU MLP) at 1 to 512+ rows for the model's expert shape, checks "
                            "each against the torch reference and writes the fastest per row count into "
                            "$MOEFLOW_CACHE/kernels-<GPU>.json, which every later engine on this GPU reads at open. "
                            "Results may change at the rounding level against an untuned run (README: the "
                            "measured kernel choice); delete the file to go back.")
    p.add_argument("model", help="checkpoint directory, or a Hugging Face repo id in the local cache")
    p.add_argument("--precision", default="int4",
                   help="comma-separated min-max precisions, as the engine's precision= (int8, int4, int2, "
                        "int4-g64, ...) (default: int4)")
    p.add_argument("--group-size", type=int, default=None, help="quantization group size (default: 64; int2: 32)")
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="activation dtype (default: the checkpoint's where it is 16-bit, else bfloat16)")
    p.add_argument("--reps", type=int, default=20, help="timed calls per path and row count, after 3 warm-up calls")
    p.add_argument("--out", default=None, help="table file (default: $MOEFLOW_CACHE/kernels-<GPU name>.json)")
    p.add_argument("--json", action="store_true", help="print each entry as a JSON line, times and errors included")
    p.set_defaults(func=cmd_tune_kernels)


def summary(paths: Sequence[str]) -> str:
    """A table entry's paths as row ranges: '1-2 rows moe_decode, 3-16 dequant_torch, 17+ grouped_mma'."""
    from moeflow.runtime.kernel_choice import BUCKETS

    parts, start = [], 0
    for i in range(1, len(paths) + 1):
        if i == len(paths) or paths[i] != paths[start]:
            low = 1 if start == 0 else BUCKETS[start - 1] + 1
            rows = f"{low}+" if i == len(paths) else (str(low) if low == BUCKETS[i - 1] else f"{low}-{BUCKETS[i - 1]}")
            parts.append(f"{rows} row{'' if rows == '1' else 's'} {paths[start]}")
            start = i
    return ", ".join(parts)


def cmd_tune_kernels(args: argparse.Namespace) -> int:
    import torch

    from moeflow.models import Checkpoint, parse_arch
    from moeflow.runtime import kernel_choice, kernel_tune
    from moeflow.store.codecs import QuantCodec, codec_for

    codecs = []
    for name in (p.strip() for p in args.precision.split(",") if p.strip()):
        codec = codec_for(name, args.group_size)
        if not isinstance(codec, QuantCodec):
            raise ConfigError(f"--precision {name}: the kernel table covers min-max precisions (int8, int4, int2)")
        codecs.append(codec)
    if not codecs:
        raise ConfigError("--precision: give at least one of int8, int4, int2")
    at_least(args, "reps", 1)
    if not torch.cuda.is_available():
        raise CudaUnavailable("tune-kernels times this machine's GPU kernels, and no CUDA device is available")
    arch = parse_arch(Checkpoint(checkpoint_dir(args.model)))
    dtype_name = args.dtype or (kernel_choice.DTYPE_NAMES.get(arch.dtype) or "bfloat16")
    device = torch.device("cuda", torch.cuda.current_device())
    shape = (arch.hidden_size, arch.expert_intermediate)
    failed = 0

    def emit(line: dict[str, Any]) -> None:
        if args.json:
            print(json.dumps(line), flush=True)
        elif "paths" in line:
            print(f"int{line['bits']}-g{line['group']} {line['hidden']}x{line['inter']} {line['dtype']}: "
                  f"{summary(line['paths'])}", flush=True)
        else:
            print(f"moeflow: {line}", flush=True)

    file = None
    for codec in codecs:
        file, bad = kernel_tune.tune([shape], [codec.bits], codec.group, [kernel_choice.DTYPES[dtype_name]], device,
                                     args.reps, 3, None if args.out is None else Path(args.out), emit)
        failed += bad
    if not args.json:
        print(f"wrote {file} ({torch.cuda.get_device_name(device)})")
    return 1 if failed else 0
