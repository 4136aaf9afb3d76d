"""ExpertFlow's routing-path predictor: a small seq2seq model that predicts, from the prompt and the
tokens generated so far, which experts every MoE layer will use for the next token, before the
model computes it. Trained on recorded routing traces (`moeflow train-predictor`).

Encoder input: prompt ids (the last `max_prompt`). Decoder input: the generated ids fed back so far
(the last `window`); position t predicts the routing of decoder token t at every MoE layer as
L x E logits (multi-hot targets, BCE loss).
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from moeflow.errors import PredictorError
from moeflow.scheduling.predictors import Guess, Prediction
from moeflow.scheduling.traces import SequenceTrace, TraceHeader

WEIGHTS = "routing_predictor.safetensors"
CONFIG = "routing_predictor.json"


@dataclass(frozen=True)
class PathModelConfig:
    vocab_size: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    model: str  # the MoE model's fingerprint of shape (family and sizes), checked at load
    d_model: int = 32
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    d_ff: int = 2048
    max_prompt: int = 256
    window: int = 64


class RoutingPathModel(nn.Module):
    def __init__(self, cfg: PathModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(max(cfg.max_prompt, cfg.window), cfg.d_model)
        shape = dict(d_model=cfg.d_model, nhead=cfg.heads, dim_feedforward=cfg.d_ff, dropout=0.1,
                     batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**shape), cfg.encoder_layers, enable_nested_tensor=False  # type: ignore[arg-type]
        )
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**shape), cfg.decoder_layers)  # type: ignore[arg-type]
        self.head = nn.Linear(cfg.d_model, len(cfg.moe_layers) * cfg.num_experts)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) + self.pos(torch.arange(ids.shape[1]))[None]

    def encode(self, prompt: torch.Tensor, prompt_pad: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self._embed(prompt), src_key_padding_mask=prompt_pad)

    def decode(self, memory: torch.Tensor, tokens: torch.Tensor, prompt_pad: torch.Tensor | None = None,
               token_pad: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, L, E] for decoder tokens [B, T] given encoder memory."""
        t = tokens.shape[1]
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)  # True: may not attend
        out = self.decoder(self._embed(tokens), memory, tgt_mask=causal, tgt_key_padding_mask=token_pad,
                                memory_key_padding_mask=prompt_pad)
        return self.head(out).view(*tokens.shape, len(self.cfg.moe_layers), self.cfg.num_experts)


# ---- training --------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Example:
    prompt: list[int]
    tokens: list[int]  # decoder inputs (generated ids fed back)
    targets: list[dict[int, list[int]]]  # routing of each decoder token


def _examples(traces: list[SequenceTrace], cfg: PathModelConfig) -> list[_Example]:
    out = []
    for seq in traces:
        fed = seq.generated[: len(seq.decode)]
        for end in range(cfg.window, len(fed) + cfg.window, cfg.window):  # windows of decode steps
            lo = max(0, min(end, len(fed)) - cfg.window)
            hi = min(end, len(fed))
            if hi > lo:
                out.append(_Example(seq.prompt[-cfg.max_prompt:], fed[lo:hi], seq.decode[lo:hi]))
    return out


def _batch(examples: list[_Example], cfg: PathModelConfig) -> tuple[torch.Tensor, ...]:
    b = len(examples)
    s = max(len(e.prompt) for e in examples)
    t = max(len(e.tokens) for e in examples)
    prompt = torch.zeros(b, s, dtype=torch.long)
    prompt_pad = torch.ones(b, s, dtype=torch.bool)
    tokens = torch.zeros(b, t, dtype=torch.long)
    token_pad = torch.ones(b, t, dtype=torch.bool)
    target = torch.zeros(b, t, len(cfg.moe_layers), cfg.num_experts)
    mask = torch.zeros(b, t, len(cfg.moe_layers), 1)
    for i, e in enumerate(examples):
        prompt[i, : len(e.prompt)] = torch.tensor(e.prompt)
        prompt_pad[i, : len(e.prompt)] = False
        tokens[i, : len(e.tokens)] = torch.tensor(e.tokens)
        token_pad[i, : len(e.tokens)] = False
        for j, step in enumerate(e.targets):
            for li, layer in enumerate(cfg.moe_layers):
                if layer in step:
                    target[i, j, li, step[layer]] = 1.0
                    mask[i, j, li] = 1.0
    return prompt, prompt_pad, tokens, token_pad, target, mask


def evaluate(model: RoutingPathModel, examples: list[_Example]) -> dict[str, float]:
    """Precision/recall of the top-m predicted experts per (token, layer), m = k, 1.5k, 2k."""
    cfg = model.cfg
    k = cfg.top_k
    picks = {"k": k, "1.5k": max(k, round(1.5 * k)), "2k": 2 * k}
    tp = dict.fromkeys(picks, 0)
    n_pred = dict.fromkeys(picks, 0)
    n_act = 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), 32):
            prompt, ppad, tokens, tpad, target, mask = _batch(examples[i : i + 32], cfg)
            logits = model.decode(model.encode(prompt, ppad), tokens, ppad, tpad)
            valid = (mask[..., 0] > 0) & ~tpad[..., None]
            n_act += int(target[valid].sum())
            for name, m in picks.items():
                top = torch.topk(logits, min(m, cfg.num_experts), dim=-1).indices
                hit = target.gather(-1, top)[valid]
                tp[name] += int(hit.sum())
                n_pred[name] += hit.numel()
    out: dict[str, float] = {}
    for name in picks:
        out[f"precision@{name}"] = round(tp[name] / max(1, n_pred[name]), 4)
        out[f"recall@{name}"] = round(tp[name] / max(1, n_act), 4)
    return out


def train(traces: list[SequenceTrace], header: TraceHeader, vocab_size: int, *, epochs: int = 30,
          lr_body: float = 1e-3, lr_head: float = 1e-2, seed: int = 0, progress: bool = True,
          **shape: Any) -> tuple[RoutingPathModel, dict[str, float]]:
    """Train on 90% of the sequences, report precision/recall on the other 10%."""
    torch.manual_seed(seed)
    cfg = PathModelConfig(vocab_size, header.moe_layers, header.num_experts, header.top_k, header.model, **shape)
    order = list(range(len(traces)))
    random.Random(seed).shuffle(order)
    cut = max(1, int(0.9 * len(order))) if len(order) > 1 else len(order)
    train_set = _examples([traces[i] for i in order[:cut]], cfg)
    held_out = _examples([traces[i] for i in order[cut:]], cfg) or train_set
    if not train_set:
        raise PredictorError("the traces hold no decode steps to learn from (generate more tokens per prompt)")
    model = RoutingPathModel(cfg)
    head = list(model.head.parameters())
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": body, "lr": lr_body}, {"params": head, "lr": lr_head}], weight_decay=1e-4)
    batch_size = 16
    steps = epochs * math.ceil(len(train_set) / batch_size)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    rng = random.Random(seed)
    bar = tqdm(total=steps, desc="training routing predictor", unit="step", disable=not progress)
    for _ in range(epochs):
        model.train()
        rng.shuffle(train_set)
        for i in range(0, len(train_set), batch_size):
            prompt, ppad, tokens, tpad, target, mask = _batch(train_set[i : i + batch_size], cfg)
            logits = model.decode(model.encode(prompt, ppad), tokens, ppad, tpad)
            weight = mask.expand_as(target) * (~tpad)[..., None, None]
            loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="sum")
            loss = loss / weight.sum().clamp(min=1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.update(1)
    bar.close()
    return model, evaluate(model, held_out)


def save(model: RoutingPathModel, directory: str | os.PathLike[str], metrics: dict[str, float]) -> Path:
    d = Path(directory)
    cfg = asdict(model.cfg)
    cfg["moe_layers"] = list(model.cfg.moe_layers)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / WEIGHTS))
    (d / CONFIG).write_text(json.dumps({"config": cfg, "heldout": metrics}, indent=2))
    return d / WEIGHTS


def load(directory: str | os.PathLike[str], expect_model: str) -> RoutingPathModel | None:
    """The predictor saved beside a model, or None when there is none. PredictorError when it
    is corrupt or was trained for a different model."""
    d = Path(directory)
    if not (d / WEIGHTS).is_file():
        return None
    try:
        meta = json.loads((d / CONFIG).read_text())["config"]
        meta["moe_layers"] = tuple(meta["moe_layers"])
        cfg = PathModelConfig(**meta)
        model = RoutingPathModel(cfg)
        model.load_state_dict(load_file(str(d / WEIGHTS)))
    except Exception as e:
        raise PredictorError(f"{d / WEIGHTS}: cannot load routing predictor ({e})") from e
    if cfg.model != expect_model:
        raise PredictorError(f"{d / WEIGHTS}: trained for model {cfg.model!r}, not {expect_model!r}")
    return model.eval()


class _ExpertFlowTracker:
    def __init__(self, model: RoutingPathModel, prompt: list[int]) -> None:
        self.model = model
        cfg = model.cfg
        with torch.no_grad():
            self.memory = model.encode(torch.tensor([prompt[-cfg.max_prompt :]]))
        self.fed: list[int] = []
        self.first = True

    def begin_step(self, ids: list[int]) -> Prediction:
        if self.first:  # the prefill: its routing is known as each layer routes
            self.first = False
            return {}
        self.fed.extend(ids)
        cfg = self.model.cfg
        tokens = torch.tensor([self.fed[-cfg.window :]])
        with torch.no_grad():
            logits = self.model.decode(self.memory, tokens)[0, -1]  # [L, E]
            probs = torch.sigmoid(logits)
        top = torch.topk(probs, min(cfg.top_k + 1, cfg.num_experts), dim=-1)
        return {
            layer: [(int(e), float(p)) for e, p in zip(top.indices[i], top.values[i], strict=True)]
            for i, layer in enumerate(cfg.moe_layers)
        }

    def guess(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def after_route(self, layer: int, ids: list[list[int]], guess: Guess) -> Prediction:
        return {}


class ExpertFlowPredictor:
    """prefetch='expertflow': the trained routing-path predictor, run once per token before the
    model computes it; predicts every MoE layer at once."""

    name = "expertflow"
    wraps = False

    def __init__(self, model: RoutingPathModel, source: str) -> None:
        self.model = model
        self.source = source

    def track(self, prompt: list[int]) -> _ExpertFlowTracker:
        return _ExpertFlowTracker(self.model, prompt)
