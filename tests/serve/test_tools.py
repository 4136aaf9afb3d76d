"""Tool calling: templates render tools and tool-call history as transformers does; the Hermes and Mistral
parsers read calls out of text as vLLM's do, whole and streamed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from moeflow.serve.api_error import APIError
from moeflow.serve.chat_template import load_chat_template
from moeflow.serve.choices import Choice, Piece
from moeflow.serve.responses import ChoiceView, ToolUse
from moeflow.serve.tools import HermesParser, MistralParser, ToolCallStream, parse_tools, parser_for, template_messages
from tests.serve.test_chat_template import _checkpoint

# Qwen2.5-Instruct's template (Hermes-style <tool_call> blocks), as its tokenizer_config.json has it
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Mistral-7B-Instruct-v0.3's template: [AVAILABLE_TOOLS] before the last user turn, [TOOL_CALLS] with 9-character ids
MISTRAL = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city — «quoted» & <escaped>?",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}

# the history as an OpenAI client sends it: arguments are JSON text
HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "{\"celsius\": 21}"},
    {"role": "assistant", "content": "It is 21 °C."},
    {"role": "user", "content": "And the time?"},
]

TOOL_TEMPLATES: dict[str, tuple[dict[str, object], type]] = {"qwen2.5": ({"chat_template": QWEN25, "eos_token": "<|im_end|>"}, HermesParser),
                  "mistral": ({"chat_template": MISTRAL, "bos_token": "<s>", "eos_token": "</s>"}, MistralParser)}


def _transformers_render(path: Path, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    from transformers import PreTrainedTokenizerFast

    out = PreTrainedTokenizerFast.from_pretrained(str(path)).apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert isinstance(out, str)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(TOOL_TEMPLATES))
def test_tools_and_tool_history_render_as_transformers_renders_them(tiny_model: Path, tmp_path: Path, name: str) -> None:
    config, parser = TOOL_TEMPLATES[name]
    path = _checkpoint(tiny_model, tmp_path, config)
    template = load_chat_template(path)
    assert template is not None and template.takes_tools
    assert type(parser_for(template.source)) is parser
    messages = template_messages(HISTORY)
    # transformers takes the arguments as objects, which is what template_messages hands the template
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    for tools in ([WEATHER, CLOCK], None):
        rendered = template.render(messages, tools=tools)
        assert rendered == _transformers_render(path, messages, tools)
        assert ("get_time" in rendered) == (tools is not None)
    assert '"Paris"' in rendered and "21" in rendered  # the call and its result are in the prompt


def test_a_template_without_tools_neither_takes_them_nor_has_a_parser(tiny_model: Path, tmp_path: Path) -> None:
    from tests.serve.conftest import CHATML

    template = load_chat_template(_checkpoint(tiny_model, tmp_path, {"chat_template": CHATML}))
    assert template is not None and not template.takes_tools and parser_for(template.source) is None


@pytest.mark.parametrize(("text", "content", "calls"), [
    ("plain answer", "plain answer", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "Let me check.\n",
     [("get_weather", {"city": "Zürich"}), ("get_time", {})]),
    ('<tool_call>\n{"name": "get_time", "arguments": {}}', None, [("get_time", {})]),  # cut off before the close
    ("<tool_call>\n{not json}\n</tool_call>", "<tool_call>\n{not json}\n</tool_call>", []),
    ('<tool_call>["no", "name"]</tool_call>', '<tool_call>["no", "name"]</tool_call>', []),
])
def test_hermes_parser_reads_tool_call_blocks(text: str, content: str | None, calls: list[tuple[str, Any]]) -> None:
    got_content, got = HermesParser().parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(c.id.startswith("chatcmpl-tool-") for c in got) and len({c.id for c in got}) == len(got)


@pytest.mark.parametrize(("text", "content", "calls"), [
    ("plain answer", "plain answer", []),
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [("get_weather", {"city": "Paris"})]),
    ('Sure. [TOOL_CALLS] [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]', "Sure. ",
     [("a", {"x": 1}), ("b", {})]),
    ('[TOOL_CALLS] [{"name": "a", "arguments": {"x": [1, 2]}}] trailing words', None, [("a", {"x": [1, 2]})]),
    ('[TOOL_CALLS] {"name": "a", "arguments": {}}', None, [("a", {})]),
    ("[TOOL_CALLS] nonsense", "[TOOL_CALLS] nonsense", []),
])
def test_mistral_parser_reads_the_tool_calls_array(text: str, content: str | None, calls: list[tuple[str, Any]]) -> None:
    got_content, got = MistralParser().parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert all(len(c.id) == 9 and c.id.isalnum() for c in got)  # what Mistral's template checks


@pytest.mark.parametrize("parser", [HermesParser(), MistralParser()], ids=lambda p: p.name)
@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7])
def test_streamed_text_holds_back_tool_calls_and_agrees_with_the_whole(parser: Any, cut: int) -> None:
    call = ('<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>' if parser.name == "hermes"
            else '[TOOL_CALLS] [{"name": "get_time", "arguments": {}}]')
    for text in (f"Checking <tool now. {call}", "No call here, but a < and a [ at the end [", f"{call}"):
        stream = ToolCallStream(parser)
        shown = "".join(stream.push(text[i:i + cut]) for i in range(0, len(text), cut))
        rest, calls = stream.finish()
        whole_content, whole_calls = parser.parse(text)
        assert shown + rest == (whole_content or "" if whole_calls else text)
        assert [c.name for c in calls] == [c.name for c in whole_calls]


def _view(parser: Any, function: str | None, text: list[str], *, chat: bool = True) -> ChoiceView:
    choice = Choice(index=0, prompt_index=0, ids=[1], seed=None, max_tokens=8, tokens=len(text), finish_reason="stop",
                    text=list(text))
    return ChoiceView(choice, chat=chat, token_text=None, tools=ToolUse(parser, function))


def test_a_choice_with_a_call_finishes_with_tool_calls_streamed_and_whole() -> None:
    pieces = ["Hmm. <tool", '_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}', "\n</tool_call>"]
    view = _view(HermesParser(), None, pieces)
    bodies = [b for p in pieces if (b := view.add(Piece(p))) is not None] + view.ending()
    assert "".join(b["delta"].get("content", "") for b in bodies) == "Hmm. "
    deltas = [d for b in bodies for d in b["delta"].get("tool_calls", [])]
    assert [(d["index"], d["function"]["name"], json.loads(d["function"]["arguments"])) for d in deltas] == [
        (0, "get_weather", {"city": "Oslo"})]
    assert bodies[-1]["finish_reason"] == "tool_calls"
    whole = _view(HermesParser(), None, pieces).whole()
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == "Hmm. "
    assert whole["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_a_choice_without_a_call_is_content_with_its_own_finish_reason() -> None:
    view = _view(MistralParser(), None, ["Just ", "text ["])
    bodies = [b for p in ["Just ", "text ["] if (b := view.add(Piece(p))) is not None] + view.ending()
    assert "".join(b["delta"].get("content", "") for b in bodies) == "Just text ["
    assert bodies[-1]["finish_reason"] == "stop" and not any("tool_calls" in b["delta"] for b in bodies)
    whole = _view(MistralParser(), None, ["Just ", "text ["]).whole()
    assert whole["message"] == {"role": "assistant", "content": "Just text ["} and whole["finish_reason"] == "stop"


def test_a_named_function_reads_the_output_as_its_arguments() -> None:
    use = ToolUse(HermesParser(), "get_weather")
    assert use.prefix == '<tool_call>\n{"name": "get_weather", "arguments": ' and use.stop == ("</tool_call>",)
    whole = _view(HermesParser(), "get_weather", [' {"city": ', '"Rome"}}\n']).whole()
    call = whole["message"]["tool_calls"][0]["function"]
    assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Rome"})
    assert whole["finish_reason"] == "stop"  # vLLM's: a forced call keeps how the generation ended
    garbled = _view(MistralParser(), "get_weather", ["no json"]).whole()["message"]["tool_calls"][0]
    assert garbled["function"]["arguments"] == "no json" and len(garbled["id"]) == 9
    number = _view(HermesParser(), "get_weather", [" 5 apples"]).whole()["message"]["tool_calls"][0]
    assert number["function"]["arguments"] == "5 apples"  # JSON, but not an object: the text as written
    assert ToolUse(MistralParser(), "f").prefix == '[TOOL_CALLS] [{"name": "f", "arguments": '


@pytest.mark.parametrize(("body", "param"), [
    ({"tools": {"a": 1}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
])
def test_bad_tools_are_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as raised:
        parse_tools(body)
    assert raised.value.param == param and raised.value.status == 400


def test_tool_choice_none_auto_and_named_are_read() -> None:
    assert parse_tools({}) is None and parse_tools({"tools": [], "tool_choice": "none"}) is None
    assert parse_tools({"tools": [WEATHER]}).choice == "auto"  # type: ignore[union-attr]
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}).choice == "none"  # type: ignore[union-attr]
    named = parse_tools({"tools": [WEATHER, CLOCK], "parallel_tool_calls": False,
                         "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert named is not None and (named.choice, named.function, named.parallel) == ("function", "get_time", False)


def test_bad_tool_call_history_is_refused_naming_the_message() -> None:
    broken = [{**HISTORY[2], "tool_calls": [{"id": "x", "type": "function",
                                              "function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(APIError, match="not valid JSON") as raised:
        template_messages(broken)
    assert raised.value.param == "messages[0].tool_calls[0].function.arguments"
    with pytest.raises(APIError) as raised:
        template_messages([{"role": "user", "content": "x", "tool_calls": []}])
    assert raised.value.param == "messages[0].tool_calls"


def test_a_special_tool_call_token_is_kept_in_the_text_the_parser_reads(tiny_model: Path) -> None:
    from tokenizers import Tokenizer

    from moeflow.request import StreamStep
    from moeflow.serve.choices import step_text
    from moeflow.serve.tools import special_marker

    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    assert special_marker(tok, MistralParser()) is None  # not in this vocabulary: plain text, decoded as such
    tok.add_tokens(["<tool_call>"])  # Qwen's: an added token, not special, so decoding keeps it
    tok.add_special_tokens(["[TOOL_CALLS]"])  # Mistral v3's: special, so decoding drops it
    assert special_marker(tok, HermesParser()) is None
    marker = special_marker(tok, MistralParser())
    assert marker is not None and marker[1] == "[TOOL_CALLS]"
    calls = tok.encode('[TOOL_CALLS] [{"name": "f", "arguments": {}}]', add_special_tokens=False).ids
    assert calls[0] == marker[0] and "[TOOL_CALLS]" not in tok.decode(calls, skip_special_tokens=True)
    text = "".join(step_text(StreamStep(i, tok.decode([i], skip_special_tokens=True)), marker) for i in calls)
    assert [c.name for c in MistralParser().parse(text)[1]] == ["f"]
    assert step_text(StreamStep(calls[1], "x"), marker) == "x"
