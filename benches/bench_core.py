"""Benchmark of the memory core against its baselines, measured in the same run; prints one JSON line.

- file_to_host_vs_dd: disk -> host arena through the transfer engine (O_DIRECT, several
  reads in flight) over `dd if=FILE of=/dev/null iflag=direct bs=4M` on the same file.
- host_copy_vs_numpy: host -> host GB/s through the engine with --copy-depth copies in
  flight (how the scheduler uses it: the next copy is queued while one runs), over
  `np.copyto` of the same blocks in the same order. Copies walk distinct blocks spread over
  the arena, as expert blocks are, so both sides stream from memory. Beside it: the figure
  one copy at a time (each pays the submit -> worker -> completion -> waiter hand-off, ~9 us,
  with nothing to overlap it), and the cache-hot figure (the same two blocks every time,
  where numpy copies from cache and the hand-off weighs most).
- alloc_free_ns: one SlabAllocator.alloc + free pair called from Python.

Ratios are reported per block size; the headline is the worst of the sizes >= 4 MiB.
Runs are interleaved (baseline, engine, baseline, ...) and the best of each is kept,
which tames noise from other tenants of the disk and memory bus.

    python benches/bench_core.py [--dir /var/tmp] [--file-mib 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from moeflow import _core

MIB = 1 << 20
GB = 1e9


def write_file(path: Path, size: int) -> None:
    """Incompressible bytes (a random 64 MiB pattern repeated), synced to disk."""
    pattern = np.random.default_rng(0).integers(0, 256, 64 * MIB, dtype=np.uint8).tobytes()
    with open(path, "wb") as out:
        for start in range(0, size, len(pattern)):
            out.write(pattern[: min(len(pattern), size - start)])
        out.flush()
        os.fsync(out.fileno())


def dd_gbps(path: Path) -> float:
    """dd's own byte count and time ("N bytes (...) copied, T s, ...")."""
    run = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "iflag=direct", "bs=4M"], capture_output=True, text=True, check=True
    )
    match = re.search(r"^(\d+) bytes.*copied, ([0-9.eE+-]+) s", run.stderr, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"cannot parse dd output: {run.stderr!r}")
    return int(match.group(1)) / float(match.group(2)) / GB


def wait_all(engine: _core.TransferEngine, count: int) -> None:
    for _ in range(count):
        done = engine.wait(60)
        if done is None or done.status != "done":
            raise RuntimeError(f"transfer did not finish: {done!r} {done.error() if done else ''}")


def file_to_host_gbps(engine: _core.TransferEngine, file_id: int, size: int, arena: _core.HostArena, block: int) -> float:
    """Read the whole file into blocks of `block` bytes, all submitted at once."""
    allocator = _core.SlabAllocator(arena, arena.size, slab_size=max(block, 64 * MIB))
    size_class = allocator.add_class(block)
    handles = [allocator.alloc(size_class) for _ in range(size // block)]
    started = time.perf_counter()
    for i, handle in enumerate(handles):
        engine.submit_read(file_id, i * block, block, allocator, handle, direct="require", owned=False)
    wait_all(engine, len(handles))
    elapsed = time.perf_counter() - started
    if engine.stats()["direct_bytes"] == 0:
        raise RuntimeError("the reads did not use O_DIRECT")
    for handle in handles:
        allocator.free(handle)
    return size / elapsed / GB


def host_copy_gbps(
    engine: _core.TransferEngine, arena: _core.HostArena, block: int, total: int, depth: int, *, hot: bool
) -> tuple[float, float, float]:
    """(engine GB/s with `depth` copies in flight, engine GB/s one at a time, numpy GB/s), each
    moving `total` bytes in `block`-sized copies.

    hot=False (the headline): copies walk distinct source/destination blocks spread over the
    arena, as expert blocks are, so both sides stream from memory. hot=True: the same two blocks
    every time, so numpy's copy runs from cache and the engine's thread hand-off shows most."""
    allocator = _core.SlabAllocator(arena, arena.size, slab_size=max(block, 64 * MIB))
    size_class = allocator.add_class(block)
    pairs = 1 if hot else max(1, min(total // block, (arena.size - 2 * block) // (2 * block)))
    srcs = [allocator.alloc(size_class) for _ in range(pairs)]
    dsts = [allocator.alloc(size_class) for _ in range(pairs)]
    src_arrays = [np.frombuffer(allocator.view(h), dtype=np.uint8) for h in srcs]
    dst_arrays = [np.frombuffer(allocator.view(h), dtype=np.uint8) for h in dsts]
    for a in src_arrays + dst_arrays:
        a[:] = 1  # fault the pages in before timing
    rounds = max(8, total // block)

    def through_engine(in_flight: int) -> float:
        started = time.perf_counter()
        for i in range(rounds):
            engine.submit_copy(allocator, srcs[i % pairs], allocator, dsts[i % pairs], block, owned=False)
            if i + 1 >= in_flight:
                wait_all(engine, 1)
        wait_all(engine, in_flight - 1)
        return rounds * block / (time.perf_counter() - started) / GB

    pipelined, serial = through_engine(depth), through_engine(1)
    started = time.perf_counter()
    for i in range(rounds):
        np.copyto(dst_arrays[i % pairs], src_arrays[i % pairs])
    numpy_gbps = rounds * block / (time.perf_counter() - started) / GB
    del src_arrays, dst_arrays
    for h in srcs + dsts:
        allocator.free(h)
    return pipelined, serial, numpy_gbps


def alloc_free_ns(iterations: int) -> float:
    arena = _core.HostArena(64 * MIB, lock=False)
    allocator = _core.SlabAllocator(arena, arena.size, slab_size=4 * MIB)
    size_class = allocator.add_class(MIB)
    alloc, free = allocator.alloc, allocator.free
    keep = alloc(size_class)  # keeps a slab assigned, as in steady state
    started = time.perf_counter_ns()
    for _ in range(iterations):
        free(alloc(size_class))
    elapsed = time.perf_counter_ns() - started
    free(keep)
    return elapsed / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/var/tmp", help="a directory on a real disk (not tmpfs)")
    parser.add_argument("--file-mib", type=int, default=1024)
    parser.add_argument("--blocks-mib", default="4,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--chunk-mib", type=int, default=8, help="largest part of a transfer")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="bytes moved per host-copy measurement")
    parser.add_argument("--copy-depth", type=int, default=2, help="host copies in flight (pipelined figure)")
    parser.add_argument("--alloc-iterations", type=int, default=200_000)
    args = parser.parse_args()
    blocks = [int(b) * MIB for b in args.blocks_mib.split(",")]
    size = args.file_mib * MIB
    if size % max(blocks):
        parser.error("--file-mib must be a multiple of every block size")

    engine = _core.TransferEngine(workers=args.workers, chunk_size=args.chunk_mib * MIB)
    arena = _core.HostArena(size + 2 * max(blocks))
    with tempfile.TemporaryDirectory(prefix="moeflow-bench-", dir=args.dir) as tmp:
        path = Path(tmp) / "experts.bin"
        write_file(path, size)
        file_id = engine.register_file(str(path))
        dd: list[float] = []
        reads: dict[int, list[float]] = {b: [] for b in blocks}
        for _ in range(args.repeats):
            for block in blocks:
                dd.append(dd_gbps(path))
                reads[block].append(file_to_host_gbps(engine, file_id, size, arena, block))
        engine.unregister_file(file_id)
    copies: dict[int, list[tuple[float, float, float]]] = {b: [] for b in blocks}
    hot_copies: dict[int, list[tuple[float, float, float]]] = {b: [] for b in blocks}
    total = int(args.copy_gib * 2**30)
    for _ in range(args.repeats):
        for block in blocks:
            copies[block].append(host_copy_gbps(engine, arena, block, total, args.copy_depth, hot=False))
            hot_copies[block].append(host_copy_gbps(engine, arena, block, total, args.copy_depth, hot=True))
    engine.close()

    dd_best = max(dd)
    read_best = {b: max(v) for b, v in reads.items()}
    pipelined_copy = {b: max(c[0] for c in v) for b, v in copies.items()}
    serial_copy = {b: max(c[1] for c in v) for b, v in copies.items()}
    numpy_copy = {b: max(c[2] for c in v) for b, v in copies.items()}
    read_ratio = {b: read_best[b] / dd_best for b in blocks}
    pipelined_ratio = {b: pipelined_copy[b] / numpy_copy[b] for b in blocks}
    copy_ratio = {b: serial_copy[b] / numpy_copy[b] for b in blocks}
    hot_ratio = {b: max(c[1] for c in hot_copies[b]) / max(c[2] for c in hot_copies[b]) for b in blocks}

    def mib(values: dict[int, float]) -> dict[str, float]:
        return {str(b // MIB): round(v, 3) for b, v in values.items()}

    big = [b for b in blocks if b >= 4 * MIB]
    print(
        json.dumps(
            {
                "file_to_host_vs_dd": round(min(read_ratio[b] for b in big), 3),
                "host_copy_vs_numpy": round(min(pipelined_ratio[b] for b in big), 3),
                "alloc_free_ns": round(alloc_free_ns(args.alloc_iterations), 1),
                "block_sizes_mib": [b // MIB for b in blocks],
                "file_to_host_vs_dd_by_block": mib(read_ratio),
                "host_copy_vs_numpy_by_block": mib(pipelined_ratio),
                "host_copy_serial_vs_numpy_by_block": mib(copy_ratio),
                "host_copy_cache_hot_vs_numpy_by_block": mib(hot_ratio),
                "file_to_host_gbps": mib(read_best),
                "dd_direct_gbps": round(dd_best, 3),
                "host_copy_gbps": mib(pipelined_copy),
                "host_copy_serial_gbps": mib(serial_copy),
                "numpy_copy_gbps": mib(numpy_copy),
                "file_mib": args.file_mib,
                "workers": args.workers,
                "chunk_mib": args.chunk_mib,
                "copy_depth": args.copy_depth,
                "arena_locked": arena.locked,
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
