"""Bad input: each case is a typed error naming the path, field or value, and nothing leaks."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from moeflow import Engine
from moeflow.errors import CheckpointError, ConfigError, InvalidRequest, StoreError, UnsupportedModel

PROMPT = [5, 17, 42, 3]


@pytest.fixture
def ckpt(hf_checkpoints, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    dst = tmp_path / "model"
    shutil.copytree(hf_checkpoints.path("mixtral"), dst, ignore=shutil.ignore_patterns(".moeflow"))
    return dst


def _edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


async def _assert_serves(eng: Engine) -> None:
    assert eng.stats()["pinned_blocks"] == 0
    res = await eng.generate(PROMPT, 3)
    assert len(res.tokens) >= 1
    assert eng.stats()["pinned_blocks"] == 0


@pytest.mark.asyncio
async def test_missing_safetensors_names_the_file(ckpt: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        await Engine.open(ckpt, device="cpu")


@pytest.mark.asyncio
async def test_truncated_safetensors_names_the_file(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        await Engine.open(ckpt, device="cpu")
    assert info.value.path == str(f)


@pytest.mark.asyncio
async def test_config_missing_a_field_names_the_field(ckpt: Path) -> None:
    _edit_config(ckpt, hidden_size=None)
    with pytest.raises(CheckpointError, match="'hidden_size'") as info:
        await Engine.open(ckpt, device="cpu")
    assert info.value.field == "hidden_size"


@pytest.mark.asyncio
async def test_unsupported_architecture_is_refused_by_name(ckpt: Path) -> None:
    _edit_config(ckpt, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(UnsupportedModel, match="LlamaForCausalLM"):
        await Engine.open(ckpt, device="cpu")


@pytest.mark.asyncio
async def test_unsupported_option_is_refused_by_name(ckpt: Path) -> None:
    _edit_config(ckpt, hidden_act="gelu")
    with pytest.raises(UnsupportedModel, match="hidden_act='gelu'"):
        await Engine.open(ckpt, device="cpu")


def test_budget_string_that_does_not_parse_is_a_config_error(ckpt: Path) -> None:
    with pytest.raises(ConfigError, match="expert_budget='12 parsecs'"):
        Engine.open(ckpt, expert_budget="12 parsecs")


def test_unknown_option_is_a_type_error(ckpt: Path) -> None:
    with pytest.raises(TypeError, match="expert_bugdet"):
        Engine.open(ckpt, expert_bugdet="1GiB")


@pytest.mark.asyncio
async def test_request_errors_name_the_value_and_leave_the_engine_serving(ckpt: Path) -> None:
    async with Engine.open(ckpt, expert_budget="40%", device="cpu") as eng:
        with pytest.raises(InvalidRequest, match="token id 96 out of range"):
            await eng.generate([1, 96], 4)
        with pytest.raises(InvalidRequest, match="token id -1"):
            await eng.logits([-1])
        with pytest.raises(InvalidRequest, match="empty prompt"):
            await eng.generate([], 4)
        with pytest.raises(InvalidRequest, match="no tokenizer"):
            await eng.generate("hello", 4)
        for bad in (0, -3):
            with pytest.raises(InvalidRequest, match=f"max_new_tokens={bad}"):
                await eng.generate(PROMPT, bad)
        await _assert_serves(eng)


@pytest.mark.asyncio
async def test_cancelled_generate_ends_clean_and_engine_serves_next(ckpt: Path) -> None:
    async with Engine.open(ckpt, expert_budget="40%", device="cpu") as eng:
        task = asyncio.create_task(eng.generate(PROMPT, 10_000, stop_at_eos=False))
        while eng.stats()["tokens"] < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _assert_serves(eng)


@pytest.mark.asyncio
async def test_store_changed_on_disk_is_detected_and_never_used(ckpt: Path) -> None:
    async with Engine.open(ckpt, device="cpu") as eng:
        data, blob = eng.session.store.data_path, eng.session.store.blob_size
    # A change that keeps size and mtime is caught by the per-blob checksum on load.
    st = data.stat()
    with data.open("r+b") as f:
        for offset in range(100, st.st_size, blob):
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))
    async with Engine.open(ckpt, expert_budget="40%", device="cpu") as eng:
        with pytest.raises(StoreError, match="checksum mismatch"):
            await eng.generate(PROMPT, 8)
        assert eng.stats()["pinned_blocks"] == 0
        assert eng.stats()["load_errors"] >= 1
    # A change that moves the mtime is caught at open: in "never" mode the store is refused ...
    data.touch()
    with pytest.raises(StoreError, match="changed on disk"):
        await Engine.open(ckpt, device="cpu", store_mode="never")
    # ... and by default it is rebuilt, after which generation works again.
    async with Engine.open(ckpt, expert_budget="40%", device="cpu") as eng:
        await _assert_serves(eng)


@pytest.mark.asyncio
async def test_token_tensor_must_be_one_dimensional(ckpt: Path) -> None:
    import torch

    async with Engine.open(ckpt, device="cpu") as eng:
        with pytest.raises(InvalidRequest, match="1-D tensor"):
            await eng.generate(torch.tensor(5), 2)
        res = await eng.generate(torch.tensor(PROMPT), 2)
        assert len(res.tokens) >= 1


def test_group_size_is_validated_before_it_is_used(ckpt: Path) -> None:
    with pytest.raises(ConfigError, match="group_size='64'"):
        Engine.open(ckpt, precision="int4", group_size="64")
    with pytest.raises(ConfigError, match="host_budget='lots'"):
        Engine.open(ckpt, host_budget="lots")
