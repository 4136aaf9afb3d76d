"""Models by name: a repo id resolves offline from a Hugging Face cache laid out as huggingface_hub writes it."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from moeflow import Engine
from moeflow.errors import CheckpointError
from moeflow.models import Checkpoint
from moeflow.models.hub import hub_snapshot, parse_repo_id, resolve_model
from moeflow.models.synth import synthesize

REPO = "tiny-org/tiny-moe"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
PROMPT = [5, 17, 42, 3]


def add_snapshot(cache: Path, repo_id: str, commit: str, source: Path, ref: str | None = "main") -> Path:
    """Lay `source`'s files out as huggingface_hub does: content-named blobs, a snapshot folder of
    relative symlinks into them, and refs/<ref> holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blobs, snapshot = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(p for p in source.iterdir() if p.is_file()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if not (blobs / digest).exists():
            shutil.copyfile(file, blobs / digest)
        (snapshot / file.name).symlink_to(os.path.relpath(blobs / digest, snapshot))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # huggingface_hub writes no newline
    return snapshot


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    synthesize(out, "mixtral", "tiny", dtype=torch.float32, progress=False, num_hidden_layers=2)
    return out


@pytest.fixture
def hub_cache(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    add_snapshot(cache, REPO, COMMIT, tiny)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("MOEFLOW_CACHE", str(tmp_path / "moeflow-cache"))
    return cache


def test_repo_id_resolves_to_the_snapshot_refs_main_points_to(hub_cache: Path, tiny: Path) -> None:
    snapshot = hub_cache / "models--tiny-org--tiny-moe" / "snapshots" / COMMIT
    assert resolve_model(REPO) == snapshot
    # an older snapshot in the same repo is reachable by its commit, refs/main still wins by default
    add_snapshot(hub_cache, REPO, OLD_COMMIT, tiny, ref=None)
    assert resolve_model(f"{REPO}@{OLD_COMMIT}") == snapshot.parent / OLD_COMMIT
    assert resolve_model(f"{REPO}@main") == snapshot
    assert Checkpoint(REPO).path == snapshot
    assert hub_snapshot(snapshot) is not None and hub_snapshot(snapshot).commit == COMMIT  # type: ignore[union-attr]


def test_hf_home_is_used_when_hf_hub_cache_is_unset(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))
    assert resolve_model(REPO).parent.parent == hub_cache / "models--tiny-org--tiny-moe"


def test_an_existing_folder_is_itself_even_when_shaped_like_a_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny-org" / "tiny-moe").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(REPO) == Path(REPO)
    assert parse_repo_id("./a/b") is None and parse_repo_id("/abs/path") is None
    assert parse_repo_id("Qwen/Qwen3-30B-A3B@v1.0") == ("Qwen/Qwen3-30B-A3B", "v1.0")


def test_a_missing_model_says_where_moeflow_looked(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError) as err:
        resolve_model("nobody/missing-model")
    text = str(err.value)
    assert str(hub_cache / "models--nobody--missing-model") in text and "HF_HUB_CACHE" in text
    assert "downloads nothing" in text and "refs/main" in text and "hf download nobody/missing-model" in text
    with pytest.raises(CheckpointError, match=f"revision 'v9'.*{hub_cache}"):
        resolve_model(f"{REPO}@v9")
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        resolve_model("./not/here")


def test_a_snapshot_without_refs_main_is_missing(tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, COMMIT, tiny, ref=None)  # an interrupted download never wrote the ref
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    with pytest.raises(CheckpointError, match="refs/main"):
        resolve_model(REPO)
    assert resolve_model(f"{REPO}@{COMMIT}").name == COMMIT


@pytest.mark.asyncio
async def test_engine_opens_a_repo_id_and_keeps_its_store_out_of_the_snapshot(hub_cache: Path, tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with Engine.open(tiny, device="cpu", store_dir=str(tmp_path / "reference")) as eng:
        expected = (await eng.generate(PROMPT, 6, stop_at_eos=False)).tokens
    snapshot = hub_cache / "models--tiny-org--tiny-moe" / "snapshots" / COMMIT
    before = sorted(p.name for p in snapshot.iterdir())
    with caplog.at_level(logging.INFO, logger="moeflow.store"):
        eng = await Engine.open(REPO, device="cpu", expert_budget="50%")
    # the usual place for a hub model's store: said, not warned about
    assert [r.levelno for r in caplog.records if "cache snapshot" in r.getMessage()] == [logging.INFO]
    async with eng:
        assert (await eng.generate(PROMPT, 6, stop_at_eos=False)).tokens == expected
        root = eng.session.store_root
        assert eng.session.store_note and "Hugging Face cache snapshot" in eng.session.store_note
    # keyed by repo id and commit, in the per-user cache, never inside the (writable) snapshot
    assert root == tmp_path / "moeflow-cache" / "hub" / "tiny-org--tiny-moe" / COMMIT
    assert list(root.glob("*/manifest.json"))
    assert sorted(p.name for p in snapshot.iterdir()) == before
    assert not (hub_cache / "models--tiny-org--tiny-moe" / "blobs" / ".moeflow").exists()
