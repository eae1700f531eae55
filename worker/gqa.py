"""Grouped-query attention through ``scaled_dot_product_attention(enable_gqa=True)`` for LitGPT.

LitGPT 0.5.13's ``CausalSelfAttention.forward`` (litgpt/model.py, "Grouped queries: balance the
number of heads") materialises ``k.repeat_interleave(n_head // n_query_groups, dim=1)`` and the same
for ``v`` before calling ``F.scaled_dot_product_attention`` without ``enable_gqa``. For MoE-200M
(12 query heads, 4 KV groups) that copies K and V three-fold in every layer and makes backward
reduce the repeated gradients again. Since PyTorch 2.5 SDPA takes the un-repeated K/V with
``enable_gqa=True`` (query head h reads KV group ``h // (n_head // n_query_groups)``, the same
mapping as ``repeat_interleave``).

:class:`GQASelfAttention` is a subclass of LitGPT's ``CausalSelfAttention`` with the same
parameters (so identical ``state_dict`` keys); its ``forward`` takes the ``enable_gqa`` path for
training-style calls (no KV cache, no explicit mask, no sliding window, no logit soft-capping) and
defers to LitGPT's own ``forward`` otherwise. :func:`use_gqa_attention` switches a model's
attention modules to it in place.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from litgpt.model import CausalSelfAttention, apply_rope, apply_rope_interleave
from torch import Tensor, nn

__all__ = ["GQASelfAttention", "use_gqa_attention"]


class GQASelfAttention(CausalSelfAttention):
    """``CausalSelfAttention`` whose training forward calls SDPA with ``enable_gqa=True``.

    Shapes as LitGPT's: ``x`` ``(B, T, n_embd)``, ``cos``/``sin`` ``(1, T, rope_n_elem)`` ->
    ``(B, T, n_embd)``. Numerically the same function (SDPA may pick a different kernel).
    """

    def _gqa_applies(self, mask: Tensor | None, input_pos: Tensor | None) -> bool:
        cfg = self.config
        return (
            input_pos is None
            and mask is None
            and not self.apply_sliding_window_attention
            and cfg.attention_logit_softcapping is None
            and cfg.n_query_groups != cfg.n_head
        )

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        input_pos_maxp1: int | None = None,
    ) -> Tensor:
        if not self._gqa_applies(mask, input_pos):
            return super().forward(x, cos, sin, mask, input_pos, input_pos_maxp1)
        cfg = self.config
        B, T, _ = x.size()
        hs, n_head, n_groups = cfg.head_size, cfg.n_head, cfg.n_query_groups
        q, k, v = self.qkv(x).split((n_head * hs, n_groups * hs, n_groups * hs), dim=-1)
        if cfg.norm_qk and cfg.norm_qk_type == "olmo2":
            q, k = self.norm_q(q), self.norm_k(k)
        q = q.view(B, T, n_head, hs).transpose(1, 2)  # (B, nh_q, T, hs)
        k = k.view(B, T, n_groups, hs).transpose(1, 2)  # (B, nh_kv, T, hs)
        v = v.view(B, T, n_groups, hs).transpose(1, 2)
        if cfg.norm_qk and cfg.norm_qk_type == "default":
            q, k = self.norm_q(q), self.norm_k(k)
        rope = apply_rope_interleave if cfg.rope_interleave else apply_rope
        n_rope = cfg.rope_n_elem
        q = _cat_rope(rope, q, n_rope, cos, sin)
        k = _cat_rope(rope, k, n_rope, cos, sin)
        scale = 1.0 / math.sqrt(cfg.attention_scores_scalar or hs) * self.mscale * self.mscale
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=0.0, scale=scale, is_causal=True, enable_gqa=True
        )
        y = y.transpose(1, 2).reshape(B, T, hs * n_head)
        return self.proj(y)


def _cat_rope(rope, t: Tensor, n_rope: int, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding on the first ``n_rope`` channels of ``t`` ``(B, nh, T, hs)``."""
    return torch.cat((rope(t[..., :n_rope], cos, sin), t[..., n_rope:]), dim=-1)


def use_gqa_attention(model: nn.Module) -> int:
    """Switch every LitGPT ``CausalSelfAttention`` in ``model`` to :class:`GQASelfAttention` in place.

    Only the class changes (parameters, buffers and ``state_dict`` keys stay); subclasses
    (LoRA/adapter variants) are left alone. Call before ``torch.compile``.

    Returns:
        The number of modules switched that use grouped-query attention
        (``n_query_groups != n_head``); modules with plain multi-head attention are switched too
        but not counted, as nothing changes for them.
    """
    n = 0
    for module in model.modules():
        if type(module) is CausalSelfAttention:
            module.__class__ = GQASelfAttention
            config: Any = module.config  # litgpt.Config (LitGPT carries no type information)
            n += config.n_query_groups != config.n_head
    return n
