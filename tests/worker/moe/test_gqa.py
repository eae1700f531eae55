"""worker/gqa.py: SDPA with enable_gqa gives LitGPT's attention outputs and gradients (CPU, fast)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # importorskip's modules are Any: annotations name the real classes
    from litgpt import Config
    from torch import Tensor

torch = pytest.importorskip("torch")
litgpt = pytest.importorskip("litgpt")

from litgpt.model import CausalSelfAttention  # noqa: E402

from worker.gqa import GQASelfAttention, use_gqa_attention  # noqa: E402


def config(**overrides) -> Config:
    kwargs = dict(
        n_embd=64,
        n_head=8,
        n_query_groups=2,
        n_layer=2,
        block_size=32,
        vocab_size=80,
        padded_vocab_size=80,
        mlp_class_name="LLaMAMoE",
        n_expert=4,
        n_expert_per_token=2,
        moe_intermediate_size=32,
        norm_class_name="RMSNorm",
        bias=False,
    )
    kwargs.update(overrides)
    return litgpt.Config(**kwargs)


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # GQA, LitGPT's default rotary_percentage 0.25 (as MoE-200M)
        dict(n_query_groups=1),  # multi-query
        dict(rotary_percentage=1.0, rope_interleave=True),
        dict(norm_qk=True),
        dict(norm_qk=True, norm_qk_type="olmo2"),
        dict(attention_scores_scalar=24),
        dict(bias=True),
    ],
    ids=[
        "gqa",
        "mqa",
        "full-rope-interleaved",
        "norm-qk",
        "norm-qk-olmo2",
        "scores-scalar",
        "bias",
    ],
)
def test_model_parity_with_stock_attention(overrides):
    torch.manual_seed(0)
    cfg = config(**overrides)
    stock = litgpt.GPT(cfg)
    ours = copy.deepcopy(stock)
    assert use_gqa_attention(ours) == cfg.n_layer
    assert all(type(b.attn) is GQASelfAttention for b in ours.transformer.h)
    assert list(stock.state_dict()) == list(ours.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 13))
    out_s, out_o = stock(idx), ours(idx)
    grad = torch.randn_like(out_s)  # random upstream gradient
    g_s = torch.autograd.grad(out_s, list(stock.parameters()), grad)
    g_o = torch.autograd.grad(out_o, list(ours.parameters()), grad)
    assert rel_err(out_o, out_s) < 1e-5
    for (name, _), a, b in zip(stock.named_parameters(), g_o, g_s, strict=False):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_parity(device):
    # on CUDA this runs SDPA's flash kernel with enable_gqa (head_size 64, bf16)
    torch.manual_seed(0)
    cfg = config(n_embd=512, n_head=8, n_query_groups=2)
    stock = litgpt.GPT(cfg).to(device, torch.bfloat16)
    ours = copy.deepcopy(stock)
    use_gqa_attention(ours)
    idx = torch.randint(0, 80, (2, 32), device=device)
    out_s, out_o = stock(idx), ours(idx)
    grad = torch.randn_like(out_s)
    g_s = torch.autograd.grad(out_s, list(stock.parameters()), grad)
    g_o = torch.autograd.grad(out_o, list(ours.parameters()), grad)
    assert rel_err(out_o, out_s) < 1e-2
    for (name, _), a, b in zip(stock.named_parameters(), g_o, g_s, strict=False):
        assert rel_err(a, b) < 1e-2, name


def test_kv_cache_path_defers_to_litgpt():
    torch.manual_seed(0)
    cfg = config(rotary_percentage=1.0)
    stock = litgpt.GPT(cfg).eval()
    ours = copy.deepcopy(stock)
    use_gqa_attention(ours)
    idx = torch.randint(0, cfg.vocab_size, (1, 6))
    for model in (stock, ours):
        model.set_kv_cache(batch_size=1)
    with torch.no_grad():
        pos = torch.arange(6)
        assert rel_err(ours(idx, input_pos=pos), stock(idx, input_pos=pos)) < 1e-5


def test_plain_multi_head_attention_is_switched_but_not_counted():
    model = litgpt.GPT(config(n_query_groups=8))
    assert use_gqa_attention(model) == 0
    assert isinstance(model.transformer.h[0].attn, CausalSelfAttention)
