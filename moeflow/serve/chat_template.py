"""A checkpoint's chat template, found and rendered with jinja2 the way transformers' apply_chat_template does."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from moeflow.errors import CheckpointError

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class TemplateError(ValueError):
    """The template refused the conversation (its raise_exception) or failed to render."""


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class ChatTemplate:
    """The compiled template plus the special tokens it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
            # transformers' own filter: jinja's escapes HTML characters, which a prompt must not
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def strftime_now(fmt: str) -> str:
            return datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        self._jinja_error = jinja2.exceptions.TemplateError
        self.source = source
        self.special_tokens = special_tokens
        self._env = env
        self._render: Callable[..., str] = env.from_string(source).render

    def render(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> str:
        """The prompt, as apply_chat_template(messages, tools=tools, tokenize=False) gives it: tools are
        JSON-schema dicts handed over as they are."""
        try:
            return self._render(messages=messages, tools=tools, documents=None,
                                add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except self._jinja_error as e:
            raise TemplateError(str(e)) from None
        except (TypeError, ValueError, LookupError) as e:  # e.g. `'x' + none` on a message without content
            raise TemplateError(f"{type(e).__name__}: {e}") from None

    @property
    def takes_tools(self) -> bool:
        """Whether the template reads the `tools` variable at all (one that does not would drop them)."""
        import jinja2.meta

        return "tools" in jinja2.meta.find_undeclared_variables(self._env.parse(self.source))


def load_chat_template(checkpoint: Path) -> ChatTemplate | None:
    """The template of `checkpoint` (chat_template.jinja, else tokenizer_config.json's
    "chat_template"), or None when it has none. A named-template list picks "default"."""
    config: dict[str, Any] = {}
    config_path = checkpoint / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config_path}: unreadable ({e})", path=str(config_path)) from None
    special = {name: text for name in _SPECIAL if (text := _token_text(config.get(name))) is not None}
    jinja_path = checkpoint / "chat_template.jinja"
    if jinja_path.is_file():
        return ChatTemplate(jinja_path.read_text(encoding="utf-8"), special)
    source = config.get("chat_template")
    if isinstance(source, list):  # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    if not isinstance(source, str):
        raise CheckpointError(f"{config_path}: chat_template is a {type(source).__name__}, not a string",
                              path=str(config_path), field="chat_template")
    return ChatTemplate(source, special)
