"""Train a small OLMoE-style language model on the Python standard library's sources.

Random weights route with none of the locality of trained models, so prefetch figures on them
mean little. This recipe trains a model whose routing specializes, on a corpus every machine
has offline (CPython's own .py files: code, comments, docstrings; see moeflow/corpus.py).

Recipe (the defaults below): byte-level BPE, vocab 2048, trained on the train split; OLMoE
shape: MoE in every layer, no shared expert, 6 layers, hidden 192, 4 heads, 16 experts of
intermediate 128, top-2, load-balancing loss 0.01. AdamW (lr 3e-3, betas 0.9/0.95, wd 0.1),
100 warm-up steps then cosine to 10%, batches of 16 x 256 tokens, seed 0. Weights are saved
in bfloat16 (about 17 MB) with transformers' save_pretrained, so the checkpoint is in the
real Hub layout.

    python benches/train_moe.py --out benches/models/olmoe-stdlib --steps 2000

prints one JSON line: final train/held-out loss and the SRP (segment length 16) of the trained
model against a randomly initialized one of the same shape.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow import corpus  # noqa: E402
from moeflow.models.synth import BOS, EOS, train_tokenizer  # noqa: E402

SHAPE = dict(
    vocab_size=2048,
    hidden_size=192,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=16,
    num_experts_per_tok=2,
    max_position_embeddings=1024,
    router_aux_loss_coef=0.01,
    output_router_logits=True,
    norm_topk_prob=False,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=0,
    tie_word_embeddings=False,
)


def token_stream(tok, split: str, max_bytes: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    ids: list[int] = []
    for doc in corpus.documents(split, max_bytes):
        ids.extend(tok.encode(doc, add_special_tokens=False).ids)
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def batches(data: torch.Tensor, batch: int, seq: int, gen: torch.Generator):  # type: ignore[no-untyped-def]
    while True:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=gen)
        yield torch.stack([data[s : s + seq] for s in starts.tolist()])


def routing_metrics(model, data: torch.Tensor, seq: int = 256, windows: int = 16, segment: int = 16) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Layer means over held-out windows: SRP (MoE-LRC) at `segment`; SRP of the same routing with
    tokens shuffled in time (what popularity alone explains); and the normalized entropy of expert
    use (1 = balanced, 0 = everything on one expert)."""
    import random

    from moeflow.analysis.locality import srp

    k = model.config.num_experts_per_tok
    e = model.config.num_experts
    per_layer: list[list[list[list[int]]]] | None = None  # layer -> window -> token -> experts
    token_ids = data[: windows * seq].tolist()
    with torch.no_grad():
        for w in range(windows):
            chunk = data[w * seq : (w + 1) * seq][None]
            logits = model(chunk, output_router_logits=True).router_logits  # per layer [T, E]
            if per_layer is None:
                per_layer = [[] for _ in logits]
            for layer, lg in enumerate(logits):
                per_layer[layer].append(torch.topk(lg, k, dim=-1).indices.tolist())
    assert per_layer is not None
    rng = random.Random(0)
    srps, shuffled, entropy, nmi = [], [], [], []
    for routes in per_layer:
        nmi.append(_token_expert_nmi(token_ids, [tok for r in routes for tok in r], e))
        srps.append(srp(routes, segment, k))
        flat = [tok for r in routes for tok in r]
        rng.shuffle(flat)
        shuffled.append(srp([flat[i : i + seq] for i in range(0, len(flat), seq)], segment, k))
        counts = torch.bincount(torch.tensor(flat).flatten(), minlength=e).float()
        p = counts / counts.sum()
        entropy.append(float(-(p[p > 0] * p[p > 0].log()).sum() / torch.log(torch.tensor(float(e)))))
    mean = lambda xs: round(sum(xs) / len(xs), 4)  # noqa: E731
    return {
        "srp16": mean(srps),
        "srp16_time_shuffled": mean(shuffled),
        "expert_use_entropy": mean(entropy),
        "token_expert_nmi": mean(nmi),
    }


def _token_expert_nmi(tokens: list[int], routes: list[list[int]], num_experts: int) -> float:
    """I(expert; token) / H(expert) over (token, chosen expert) pairs: how much of the routing the
    token itself decides (0: routing ignores the token; 1: the token alone decides it)."""
    from collections import Counter

    pairs = Counter((t, e) for t, experts in zip(tokens, routes, strict=True) for e in experts)
    by_token = Counter(t for t, experts in zip(tokens, routes, strict=True) for _ in experts)
    by_expert = Counter(e for experts in routes for e in experts)
    n = sum(pairs.values())
    h_expert = -sum(c / n * math.log(c / n) for c in by_expert.values())
    mi = sum(c / n * math.log(c * n / (by_token[t] * by_expert[e])) for (t, e), c in pairs.items())
    return mi / h_expert if h_expert else 0.0


def evaluate(path: Path, seed: int) -> dict[str, object]:
    """Routing metrics of a saved model and of a random initialization of its shape."""
    from tokenizers import Tokenizer
    from transformers import OlmoeConfig, OlmoeForCausalLM

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    heldout = token_stream(tok, "heldout", 2 << 20)
    trained = OlmoeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    random_init = OlmoeForCausalLM(OlmoeConfig(**SHAPE)).eval()
    return {"trained": routing_metrics(trained, heldout), "random_init": routing_metrics(random_init, heldout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--corpus-bytes", type=int, default=12 << 20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--evaluate-only", action="store_true", help="report the routing metrics of --out and exit")
    args = ap.parse_args()
    if args.evaluate_only:
        print(json.dumps(evaluate(Path(args.out), args.seed)))
        return

    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(SHAPE["vocab_size"], max_bytes=8 << 20)
    train = token_stream(tok, "train", args.corpus_bytes)
    heldout = token_stream(tok, "heldout", 2 << 20)
    cfg = OlmoeConfig(**SHAPE)
    model = OlmoeForCausalLM(cfg)
    baseline = routing_metrics(model.eval(), heldout)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warmup = 100

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    started = time.time()
    loss_ema = None
    for step, batch in enumerate(batches(train, args.batch, args.seq + 1, gen)):
        if step >= args.steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_ema = loss.item() if loss_ema is None else 0.98 * loss_ema + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step:5d}  loss {loss_ema:.3f}  lr {lr_at(step):.2e}  {time.time() - started:.0f}s",
                  file=sys.stderr, flush=True)
    model.eval()
    with torch.no_grad():
        evals = [model(heldout[i : i + args.seq][None], labels=heldout[i : i + args.seq][None]).loss.item()
                 for i in range(0, 32 * args.seq, args.seq)]
    trained = routing_metrics(model, heldout)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    result = {
        "steps": args.steps,
        "train_loss": round(loss_ema or 0.0, 4),
        "heldout_loss": round(sum(evals) / len(evals), 4),
        "trained": trained,
        "random_init": baseline,
        "train_seconds": round(time.time() - started),
        "tokens_seen": args.steps * args.batch * args.seq,
    }
    (out / "training.json").write_text(json.dumps({"recipe": vars(args), "shape": SHAPE, "result": result}, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
