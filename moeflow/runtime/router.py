"""Router: gate logits -> (expert ids, combine weights) exactly as each family's reference computes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.models.base import RouterSpec
from moeflow.runtime.cpu_bf16 import linear

# T = tokens, E = routed experts, K = experts per token, G = groups.


class Router:
    def __init__(self, spec: RouterSpec, weight: torch.Tensor, bias: torch.Tensor | None,
                 gate_bias: torch.Tensor | None = None) -> None:
        self.spec = spec
        self.weight = weight.float() if spec.fp32_logits else weight  # [E, H]
        self.bias = bias.float() if bias is not None else None  # [E] (DeepSeek-V3 score correction)
        self.gate_bias = gate_bias  # [E] GPT-OSS: the gate linear's own bias, in the weight's dtype

    def to(self, device: torch.device) -> Router:
        self.weight = self.weight.to(device)
        self.bias = self.bias.to(device) if self.bias is not None else None
        self.gate_bias = self.gate_bias.to(device) if self.gate_bias is not None else None
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gate logits [T, E] (float32 for DeepSeek, the compute dtype otherwise)."""
        return linear(x.float() if self.spec.fp32_logits else x, self.weight, self.gate_bias)

    def select(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [T, K], combine weights [T, K]) from gate logits [T, E]."""
        s = self.spec
        if s.topk_method == "noaux_tc":
            return self._noaux_tc(logits)
        if s.scoring == "sigmoid" and s.topk_method == "greedy":
            # Llama-4: the k largest logits, each through a sigmoid (float32, back to the logits' dtype)
            top, ids = torch.topk(logits, s.top_k, dim=-1)
            return ids, torch.sigmoid(top.float()).to(logits.dtype)
        if s.topk_method == "sparsemixer":
            return self._sparsemixer(logits)
        if s.topk_method == "greedy" and s.norm_topk_prob:
            # The softmax of the k largest logits is the renormalized top-k of the full softmax
            # (equal up to rounding): one topk and one softmax instead of softmax, topk, sum, divide.
            top, ids = torch.topk(logits, s.top_k, dim=-1)
            weights = F.softmax(top, dim=-1, dtype=torch.float32)
        else:
            probs = F.softmax(logits, dim=-1, dtype=torch.float32)
            if s.topk_method == "group_limited_greedy":
                group_max = probs.view(-1, s.n_group, s.num_experts // s.n_group).amax(-1)
                probs = probs.masked_fill(~self._group_mask(group_max), 0.0)
            weights, ids = torch.topk(probs, s.top_k, dim=-1)
            if s.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        if s.routed_scaling_factor != 1.0:
            weights = weights * s.routed_scaling_factor
        if not s.keep_fp32_weights and not s.fp32_logits and weights.dtype != dtype:
            weights = weights.to(dtype)
        return ids, weights

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[T, E] bool: experts inside the topk_group best groups."""
        s = self.spec
        chosen = torch.topk(group_scores, s.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)  # [T, G]
        return mask.repeat_interleave(s.num_experts // s.n_group, dim=-1)

    def _noaux_tc(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        # MiniMax-M2's gate runs in the weights' dtype, its sigmoid in float32 (DeepSeek's logits are float32)
        scores = (logits if logits.dtype == torch.float32 else logits.float()).sigmoid()
        choice = scores + self.bias if self.bias is not None else scores
        if s.topk_group < s.n_group:  # with every group kept (MiniMax-M2, GLM-4.5) the mask is all true
            per_group = choice.view(-1, s.n_group, s.num_experts // s.n_group)
            group_scores = per_group.topk(min(2, per_group.shape[-1]), dim=-1)[0].sum(-1)  # [T, G]
            choice = choice.masked_fill(~self._group_mask(group_scores), float("-inf"))
        ids = torch.topk(choice, s.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if s.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * s.routed_scaling_factor if s.routed_scaling_factor != 1.0 else weights

    def _sparsemixer(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Phi-3.5-MoE's sparsemixer without training, op for op as transformers computes it: pick
        the largest logit; its weight is its softmax over the experts whose logits lie within
        2 * jitter_eps (relative) of it. Then the same for the largest remaining logit, measured
        against the original logits. The two weights are not renormalized (and run in the
        logits' dtype)."""
        eps2 = 2 * self.spec.jitter_eps
        top1, id1 = logits.max(dim=-1, keepdim=True)  # [T, 1]
        far = ((top1 - logits) / logits.abs().clamp(min=top1)) > eps2
        w1 = torch.softmax(logits.masked_fill(far, float("-inf")), dim=-1).gather(-1, id1)
        rest = torch.scatter(logits, -1, id1, float("-inf"))
        top2, id2 = rest.max(dim=-1, keepdim=True)
        far = ((top2 - logits) / logits.abs().clamp(min=top2)) > eps2
        w2 = torch.softmax(rest.masked_fill(far, float("-inf")), dim=-1).gather(-1, id2)
        return torch.cat((id1, id2), dim=-1), torch.cat((w1, w2), dim=-1)
