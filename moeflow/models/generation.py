"""A checkpoint's generation_config.json: its end-of-sequence ids and its sampling defaults."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeflow.errors import CheckpointError

FILE = "generation_config.json"
# The sampling fields a request may leave unset (None) to get the model's value.
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class GenerationConfig:
    """What generation_config.json says (None: the field is absent).

    Defaults follow transformers' generate: without `do_sample: true` decoding is greedy, whatever
    temperature / top_k / top_p / min_p the file holds; repetition_penalty applies either way.
    Unlike transformers (whose unset top_k means 50), only fields present in the file become
    defaults, as vLLM reads the file."""

    eos_token_ids: tuple[int, ...] = ()
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def sampling(self, **given: Any) -> dict[str, Any]:
        """SamplingParams' fields from a request's values, the unset (None) ones from this file:
        `given` holds SAMPLING_FIELDS (and may hold others, passed through)."""
        out = dict(given)
        if out.get("temperature") is None:
            out["temperature"] = (1.0 if self.temperature is None else self.temperature) if self.do_sample else 0.0
        for name in ("top_k", "top_p", "min_p"):
            if out.get(name) is None and self.do_sample:
                out[name] = getattr(self, name)
        if out.get("repetition_penalty") is None:
            out["repetition_penalty"] = 1.0 if self.repetition_penalty is None else self.repetition_penalty
        return out


def _number(file: Path, name: str, value: object, *, integer: bool = False) -> float | int:
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) \
            or not math.isfinite(value):
        raise CheckpointError(f"{file}: field {name!r} must be {kind}, got {value!r}", path=str(file), field=name)
    return value


def _checked(file: Path, name: str, value: object) -> float | int:
    """One sampling field's value, refused (naming file and field) outside what SamplingParams takes."""
    if name == "top_k":
        top_k = int(_number(file, name, value, integer=True))
        if top_k < 0:
            raise CheckpointError(f"{file}: field 'top_k' must be >= 0 (0: no top-k), got {value!r}",
                                  path=str(file), field=name)
        return top_k
    number = float(_number(file, name, value))
    ranges = {"temperature": (number >= 0, ">= 0"), "top_p": (0 < number <= 1, "in (0, 1]"),
              "min_p": (0 <= number <= 1, "in [0, 1]"), "repetition_penalty": (number > 0, "> 0")}
    ok, why = ranges[name]
    if not ok:
        raise CheckpointError(f"{file}: field {name!r} must be {why}, got {value!r}", path=str(file), field=name)
    return number


def load_generation_config(folder: Path) -> GenerationConfig:
    """The folder's generation_config.json, or an empty GenerationConfig when it has none.
    CheckpointError (naming the file and field) for unreadable JSON or a bad value."""
    file = Path(folder) / FILE
    if not file.is_file():
        return GenerationConfig()
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read it as JSON ({e})", path=str(file)) from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(data).__name__}", path=str(file))
    eos = data.get("eos_token_id")
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise CheckpointError(f"{file}: field 'eos_token_id' must be a token id or a list of them, got {eos!r}",
                                  path=str(file), field="eos_token_id")
    do_sample = data.get("do_sample", False)
    if do_sample is None:
        do_sample = False
    if not isinstance(do_sample, bool):
        raise CheckpointError(f"{file}: field 'do_sample' must be true or false, got {do_sample!r}",
                              path=str(file), field="do_sample")
    values: dict[str, Any] = {}
    for name in SAMPLING_FIELDS:
        if data.get(name) is not None:
            values[name] = _checked(file, name, data[name])
    if values.get("top_k") == 0:  # transformers' "no top-k"
        values["top_k"] = None
    return GenerationConfig(eos_token_ids=tuple(dict.fromkeys(ids)), do_sample=do_sample, **values)
