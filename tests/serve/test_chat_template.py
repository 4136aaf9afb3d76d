"""Chat templates render exactly as transformers' apply_chat_template renders them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moeflow.serve.chat_template import TemplateError, load_chat_template
from tests.serve.conftest import CHATML

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# Block tags on their own lines: only trim_blocks / lstrip_blocks keep these out of the prompt;
# tojson must not HTML-escape.
MULTILINE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] == 'system' %}
System: {{ message['content'] | tojson }}
    {% else %}
{{ message['role'] | capitalize }}: {{ message['content'] }}{{ eos_token }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
Assistant:
{% endif %}"""

CONVERSATION = [
    {"role": "system", "content": "You write <short> & 'careful' code."},
    {"role": "user", "content": "  Sort a list in Python.  "},
    {"role": "assistant", "content": "sorted(xs) — or xs.sort()"},
    {"role": "user", "content": "And reversed? 日本"},
]


def _checkpoint(tiny_model: Path, tmp_path: Path, config: dict[str, object], jinja: str | None = None) -> Path:
    out = tmp_path / "ckpt"
    out.mkdir()
    shutil.copy(tiny_model / "tokenizer.json", out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (out / "chat_template.jinja").write_text(jinja)
    return out


def _transformers_render(path: Path, messages: list[dict[str, str]]) -> str:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    out = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(out, str)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("name", "config", "jinja"), [
    ("chatml", {"chat_template": CHATML, "eos_token": "<|im_end|>"}, None),
    ("llama2", {"chat_template": LLAMA2, "bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True}}, None),
    ("multiline-jinja-file", {"bos_token": "<s>", "eos_token": "</s>"}, MULTILINE),
])
def test_rendering_equals_transformers_apply_chat_template(
    tiny_model: Path, tmp_path: Path, name: str, config: dict[str, object], jinja: str | None
) -> None:
    path = _checkpoint(tiny_model, tmp_path, config, jinja)
    template = load_chat_template(path)
    assert template is not None
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        expected = _transformers_render(path, messages)
        assert template.render(messages) == expected
    assert "<s>" in template.render(CONVERSATION) or name == "chatml"  # bos_token reached the template


@pytest.mark.timeout(120)
def test_raise_exception_refuses_the_conversation_as_transformers_does(tiny_model: Path, tmp_path: Path) -> None:
    path = _checkpoint(tiny_model, tmp_path, {"chat_template": LLAMA2, "bos_token": "<s>", "eos_token": "</s>"})
    template = load_chat_template(path)
    assert template is not None
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TemplateError, match="roles must alternate"):
        template.render(bad)
    with pytest.raises(Exception, match="roles must alternate"):
        _transformers_render(path, bad)


def test_a_checkpoint_without_a_template_has_none(tiny_model: Path, tmp_path: Path) -> None:
    assert load_chat_template(_checkpoint(tiny_model, tmp_path, {"eos_token": "</s>"})) is None
