"""The embedding example of docs/serve.md (and README.md), run as written: a Starlette app mounting create_app(engine)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.serve.conftest import live_server

DOC = Path(__file__).resolve().parents[2] / "docs" / "serve.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) == 1, f"{DOC}: expected one python example, found {len(blocks)}"
    return str(blocks[0])


def test_the_readme_shows_the_same_example() -> None:
    readme = (DOC.parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"```python\n{_example()}```" in readme, "README.md's embedding example differs from docs/serve.md's"


def test_the_example_is_about_ten_lines() -> None:
    code = [line for line in _example().splitlines() if line.strip() and not line.startswith("#")]
    assert len(code) <= 12


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_the_docs_embedding_example_serves_under_its_mount(tiny_model: Path) -> None:
    source = _example()
    assert '"path/to/checkpoint"' in source
    namespace: dict[str, Any] = {}
    exec(compile(source.replace("path/to/checkpoint", str(tiny_model)), str(DOC), "exec"), namespace)
    engine = namespace["engine"]
    async with live_server(namespace["app"], lifespan="on") as url:  # the lifespan opens the engine
        async with openai.AsyncOpenAI(base_url=f"{url}/llm/v1", api_key="unused", max_retries=0) as client:
            done = await client.chat.completions.create(
                model=tiny_model.name, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
            assert done.choices[0].finish_reason == "length"
            assert done.usage is not None and done.usage.completion_tokens == 4
            assert [m.id for m in (await client.models.list()).data] == [tiny_model.name]
        assert engine.state.value == "ready"
    assert engine.state.value == "closed"  # the lifespan closed it at shutdown
