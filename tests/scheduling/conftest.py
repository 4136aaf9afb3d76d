"""The trained model (real, specialized routing) and a routing predictor trained on its traces."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from moeflow import Engine

TRAINED = Path(__file__).resolve().parents[2] / "benches" / "models" / "olmoe-stdlib"
PROMPTS = [
    "def read_config(path):\n    ",
    "class Queue:\n    def __init__(self",
    "import os\nimport sys\n\n",
    "    for key, value in items.items():\n",
    '"""Return the number of',
    "    if not isinstance(other, ",
    "try:\n    import ",
    "        raise ValueError(",
]


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy, so stores and predictors written beside it stay in the test's temp dir."""
    dst = tmp_path_factory.mktemp("trained") / "olmoe-stdlib"
    shutil.copytree(TRAINED, dst)
    return dst


@pytest.fixture(scope="session")
def predictor_model(trained_model: Path) -> Path:
    """The trained model with a routing-path predictor saved beside it (a few quick epochs)."""
    from moeflow.scheduling.traces import TraceHeader
    from moeflow.scheduling import expertflow
    from moeflow.session import model_signature

    async def traces():  # type: ignore[no-untyped-def]
        async with Engine.open(trained_model, prefetch="none", device="cpu") as eng:
            s = eng.session
            header = TraceHeader(model_signature(s.checkpoint, s.arch), s.arch.moe_layers, s.arch.num_experts, s.arch.top_k)
            return header, [await eng.trace(eng.encode(p), 24) for p in PROMPTS], s.arch.vocab_size

    header, seqs, vocab = asyncio.run(traces())
    model, _ = expertflow.train(seqs, header, vocab, epochs=3, progress=False, d_ff=128)
    expertflow.save(model, trained_model, {})
    return trained_model
