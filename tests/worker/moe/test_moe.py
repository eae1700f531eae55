"""Parity, compile and telemetry tests of worker/moe.py against LitGPT's own LLaMAMoE (CPU, fast)."""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:  # importorskip's modules are Any: annotations name the real classes
    from litgpt import Config
    from torch import Tensor

torch = pytest.importorskip("torch")
litgpt = pytest.importorskip("litgpt")

import torch.nn.functional as F  # noqa: E402
from litgpt.model import LLaMAMoE  # noqa: E402

from worker.moe import (  # noqa: E402
    GroupedMoE,
    attach_router_telemetry,
    collect_aux_losses,
    collect_router_stats,
    grouped_mm,
    router_losses,
    select_backend,
    set_router_losses,
    swap_moe_layers,
)

# fp32 and the compile/telemetry tests run on the CPU (CI); the bf16 parity tests also run on a CUDA
# GPU when one is present (bench/gpu_check.sh), where torch._grouped_mm's CUTLASS kernel and the
# padded expert groups are used. PyTorch's CUDA grouped GEMM is bf16-only on its fast path, so fp32
# on CUDA is checked with the "grouped_mm_sync" backend that GroupedMoE picks there (and "dense").
# Backend selection per capability: tests/worker/moe/test_backends.py.
CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


def moe_config(**overrides) -> Config:
    kwargs = dict(
        name="tiny-moe",
        n_embd=64,
        n_head=4,
        n_query_groups=2,
        n_layer=2,
        block_size=32,
        vocab_size=96,
        padded_vocab_size=96,
        mlp_class_name="LLaMAMoE",
        n_expert=4,
        n_expert_per_token=2,
        moe_intermediate_size=96,
        norm_class_name="RMSNorm",
        bias=False,
    )
    kwargs.update(overrides)
    return litgpt.Config(**kwargs)


def rel_err(actual: Tensor | None, expected: Tensor | None) -> float:
    """Relative Frobenius-norm error, computed in float64; None counts as zeros."""
    if actual is None and expected is None:
        return 0.0
    if actual is None:
        actual = torch.zeros_like(expected)
    if expected is None:
        expected = torch.zeros_like(actual)
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


def pair(config: Config, dtype=torch.float32, backend="auto", seed=0, device="cpu"):
    """A stock LLaMAMoE and a GroupedMoE with the same weights."""
    torch.manual_seed(seed)
    ref = LLaMAMoE(config).to(device, dtype)
    new = GroupedMoE(config, backend=backend).to(device, dtype)
    new.load_state_dict(ref.state_dict())
    return ref, new


def starve_expert_zero(moe: LLaMAMoE, expert: int = 0) -> None:
    """Gate weights such that ``expert`` gets a negative logit for any positive input."""
    with torch.no_grad():
        w = moe.gate.weight
        w.copy_(torch.rand_like(w) + 0.1)
        w[expert] = -1.0


def forward_backward(module, x, grad_out, autocast_dtype=None):
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        y = module(x)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(y, [x, *params], grad_out.to(y.dtype), allow_unused=True)
    return y, grads


def assert_parity(ref, new, x, tol, autocast_dtype=None):
    torch.manual_seed(123)
    with (
        torch.no_grad(),
        torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None),
    ):
        shape = ref(x).shape
    grad_out = torch.randn(shape, device=x.device)  # random upstream gradient, not .sum()
    y_ref, g_ref = forward_backward(ref, x, grad_out, autocast_dtype)
    y_new, g_new = forward_backward(new, x, grad_out, autocast_dtype)
    assert y_new.dtype == y_ref.dtype and y_new.shape == y_ref.shape
    assert rel_err(y_new, y_ref) < tol
    names = ["input"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g_new, g_ref, strict=False):
        assert rel_err(a, b) < tol, f"gradient of {name}: {rel_err(a, b)}"


# ------------------------------------------------------------------------------------------
# grouped_mm itself
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "device,dtype",
    [("cpu", torch.float32), ("cpu", torch.bfloat16)]
    + ([("cuda", torch.bfloat16)] if CUDA else []),
)
def test_grouped_mm_matches_per_group_matmul_with_empty_groups(device, dtype):
    torch.manual_seed(0)
    # group sizes multiples of 8 on CUDA (GroupedMoE pads them so), arbitrary on the CPU
    counts = [0, 16, 0, 24, 8] if device == "cuda" else [0, 5, 0, 11, 3]
    offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    a = torch.randn(sum(counts), 16, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(len(counts), 24, 16, device=device, dtype=dtype, requires_grad=True)
    out = grouped_mm(a, w.transpose(-2, -1), offs)
    grad = torch.randn_like(out)
    ga, gw = torch.autograd.grad(out, [a, w], grad)

    a2, w2 = a.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    pieces, start = [], 0
    for g, n in enumerate(counts):
        pieces.append(a2[start : start + n] @ w2[g].T)
        start += n
    ref = torch.cat(pieces)
    ga_ref, gw_ref = torch.autograd.grad(ref, [a2, w2], grad.double())
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(out, ref) < tol
    assert rel_err(ga, ga_ref) < tol
    assert rel_err(gw, gw_ref) < tol
    assert gw[0].abs().sum() == 0 and gw[2].abs().sum() == 0  # empty experts get zero gradient


def test_grouped_mm_custom_op_registrations_are_consistent():
    # fake (meta) function, autograd and schema of the fp32 custom op, as torch.compile sees them
    a = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(3, 8, 4, requires_grad=True)
    offs = torch.tensor([2, 2, 12], dtype=torch.int32)
    torch.library.opcheck(torch.ops.moejobs.grouped_mm.default, (a, w, offs))


def test_select_backend_rules():
    assert select_backend("cpu", None, torch.float32, (64, 96)) == "grouped_mm"
    assert select_backend("cpu", None, torch.bfloat16, (64, 96)) == "grouped_mm"
    assert (
        select_backend("cpu", None, torch.bfloat16, (64, 100)) == "dense"
    )  # 200 bytes: not 16-aligned
    assert select_backend("cpu", None, torch.float32, (6, 96)) == "dense"
    assert select_backend("cpu", None, torch.float16, (64, 96)) == "grouped_mm_sync"
    assert select_backend("mps", None, torch.float32, (64, 96)) == "dense"


# ------------------------------------------------------------------------------------------
# layer parity with LLaMAMoE
# ------------------------------------------------------------------------------------------
FP32_CASES = [("cpu", "grouped_mm"), ("cpu", "grouped_mm_sync"), ("cpu", "dense")] + (
    [("cuda", "grouped_mm_sync"), ("cuda", "dense")] if CUDA else []
)
BF16_CASES = [(d, b) for d in DEVICES for b in ("grouped_mm", "grouped_mm_sync", "dense")]


@pytest.mark.parametrize("device,backend", FP32_CASES)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (3, 16)])
@pytest.mark.parametrize("starve", [False, True], ids=["all-experts", "expert0-empty"])
def test_layer_parity_float32(device, backend, k, shape, starve):
    ref, new = pair(moe_config(n_expert_per_token=k), backend=backend, device=device)
    if starve:
        starve_expert_zero(ref)
        new.load_state_dict(ref.state_dict())
        x = torch.rand(*shape, 64, device=device) + 0.05
    else:
        x = torch.randn(*shape, 64, device=device)
    assert_parity(ref, new, x, tol=1e-5)
    fraction = new.last_token_fraction
    assert fraction.shape == (4,) and not fraction.requires_grad
    assert math.isclose(fraction.sum().item(), 1.0, rel_tol=1e-6)
    if starve:
        assert fraction[0].item() == 0.0


@pytest.mark.parametrize("device,backend", BF16_CASES)
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("starve", [False, True], ids=["all-experts", "expert0-empty"])
def test_layer_parity_bf16_true(device, backend, k, starve):
    ref, new = pair(
        moe_config(n_expert_per_token=k), dtype=torch.bfloat16, backend=backend, device=device
    )
    if starve:
        starve_expert_zero(ref)
        new.load_state_dict(ref.state_dict())
        x = (torch.rand(2, 24, 64, device=device) + 0.05).bfloat16()
    else:
        x = torch.randn(2, 24, 64, device=device, dtype=torch.bfloat16)
    assert_parity(ref, new, x, tol=1e-2)


@pytest.mark.parametrize("align", [8, 16])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("empty", [None, 0, 3], ids=["none-empty", "first-empty", "last-empty"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_layer_parity_with_padded_expert_groups(align, k, empty, bias):
    # the CUDA layout (each expert's rows padded to 16 bytes' worth), exercised on any device
    ref, new = pair(moe_config(n_expert_per_token=k, bias=bias), backend="grouped_mm")
    new.group_align = align
    x = torch.randn(3, 5, 64)
    if empty is not None:
        starve_expert_zero(ref, empty)
        new.load_state_dict(ref.state_dict())
        x = torch.rand(3, 5, 64) + 0.05
    assert_parity(ref, new, x, tol=1e-5)
    if empty is not None:
        assert new.last_token_fraction[empty].item() == 0.0


@pytest.mark.parametrize("device,backend", BF16_CASES)
def test_layer_parity_bf16_mixed_autocast(device, backend):
    ref, new = pair(moe_config(), backend=backend, device=device)
    x = torch.randn(2, 24, 64, device=device)
    assert_parity(ref, new, x, tol=1e-2, autocast_dtype=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        assert (
            new(x).dtype == ref(x).dtype == torch.float32
        )  # residual stream stays fp32, as in LitGPT


@pytest.mark.parametrize(
    "overrides",
    [
        dict(bias=True),
        dict(n_shared_expert=1),
        dict(routed_scaling_factor=2.5),
        dict(n_expert=8, n_expert_per_token=3),
        dict(
            n_expert=8,
            n_expert_groups=4,
            n_topk_groups=2,
            n_topk_scores_per_group=1,
            norm_topk_prob=True,
        ),
    ],
    ids=["bias", "shared-expert", "scaling-factor", "8-experts-top3", "grouped-router"],
)
@pytest.mark.parametrize("device,backend", BF16_CASES)
def test_layer_parity_config_variants(overrides, device, backend):
    # fp32 on the CPU (tolerance 1e-5), bf16-mixed on CUDA (1e-2)
    config = moe_config(**overrides)
    ref, new = pair(config, backend=backend, device=device)
    if config.n_expert_groups:  # LitGPT leaves GroupedTopkRouter.weight uninitialised
        torch.nn.init.normal_(ref.gate.weight, std=0.5)
        new.load_state_dict(ref.state_dict())
    cuda = device == "cuda"
    x = torch.randn(2, 9, 64, device=device)
    assert_parity(
        ref, new, x, tol=1e-2 if cuda else 1e-5, autocast_dtype=torch.bfloat16 if cuda else None
    )


def test_auto_backend_is_grouped_mm_on_cpu_for_aligned_widths():
    _, new = pair(moe_config())
    x = torch.randn(1, 3, 64)
    assert new.resolved_backend(x) == "grouped_mm"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert new.resolved_backend(x) == "grouped_mm"
    _, odd = pair(moe_config(moe_intermediate_size=30))  # 120 bytes per fp32 row: not 16-aligned
    assert odd.resolved_backend(x) == "dense"
    assert_parity(*pair(moe_config(moe_intermediate_size=30)), x, tol=1e-5)


# ------------------------------------------------------------------------------------------
# state dict and swapping
# ------------------------------------------------------------------------------------------
def test_state_dict_keys_identical_and_loadable_both_ways():
    config = moe_config(n_shared_expert=1)
    torch.manual_seed(0)
    ref, new = LLaMAMoE(config), GroupedMoE(config)
    assert list(ref.state_dict()) == list(new.state_dict())
    assert "experts.3.fc_1.weight" in new.state_dict() and "gate.weight" in new.state_dict()
    assert [n for n, _ in ref.named_parameters()] == [n for n, _ in new.named_parameters()]
    new.load_state_dict(ref.state_dict())  # stock -> ours
    other = LLaMAMoE(config)
    other.load_state_dict(new.state_dict())  # ours -> stock
    for (n, a), (_, b) in zip(ref.state_dict().items(), other.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_swap_moe_layers_keeps_parameters_and_state_dict():
    torch.manual_seed(0)
    model = litgpt.GPT(moe_config(n_layer=3))
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    before_params = [id(p) for p in model.parameters()]
    assert swap_moe_layers(model) == 3
    assert all(type(b.mlp) is GroupedMoE for b in model.transformer.h)
    assert [id(p) for p in model.parameters()] == before_params
    after_sd = model.state_dict()
    assert list(after_sd) == list(before_sd)
    assert all(torch.equal(after_sd[k], v) for k, v in before_sd.items())
    assert swap_moe_layers(model) == 0  # idempotent
    dense = litgpt.GPT(moe_config(mlp_class_name="LLaMAMLP", intermediate_size=64))
    assert swap_moe_layers(dense) == 0


def test_swap_keeps_first_k_dense_layers():
    model = litgpt.GPT(moe_config(n_layer=3, first_k_dense_replace=1, intermediate_size=64))
    assert swap_moe_layers(model) == 2
    assert type(model.transformer.h[0].mlp).__name__ == "LLaMAMLP"


@pytest.mark.parametrize("device", DEVICES)
def test_whole_model_loss_and_gradient_parity(device):
    # fp32 on the CPU; bf16-mixed on CUDA, as the engine trains there
    torch.manual_seed(0)
    config = moe_config(n_layer=3)
    stock = litgpt.GPT(config).to(device)
    ours = copy.deepcopy(stock)
    assert swap_moe_layers(ours) == 3
    idx = torch.randint(0, config.vocab_size, (3, 17), device=device)
    targets = torch.randint(0, config.vocab_size, (3, 17), device=device)
    cuda = device == "cuda"
    losses, grads = [], []
    for model in (stock, ours):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            logits = model(idx)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    loss_tol, grad_tol = (1e-3, 1e-2) if cuda else (1e-5, 1e-5)
    assert abs(losses[0].item() - losses[1].item()) <= loss_tol * abs(losses[0].item())
    for (name, _), a, b in zip(stock.named_parameters(), grads[1], grads[0], strict=False):
        assert rel_err(a, b) < grad_tol, name


# ------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "autocast,align",
    [(False, None), (True, None), (True, 8)],
    ids=["fp32", "bf16-mixed", "bf16-mixed-padded"],
)
def test_layer_compiles_fullgraph_and_matches_eager(autocast, align):
    torch._dynamo.reset()
    ref, new = pair(moe_config())
    new.group_align = align
    # aot_eager runs Dynamo and AOTAutograd (fake tensors, the backward graph) without C++ codegen:
    # it proves the layer is one graph with no host synchronisation and no data-dependent shape.
    compiled = torch.compile(new, fullgraph=True, dynamic=True, backend="aot_eager")
    dtype = torch.bfloat16 if autocast else None
    x = torch.randn(2, 11, 64)
    assert_parity(ref, compiled, x, tol=1e-2 if autocast else 1e-5, autocast_dtype=dtype)
    assert compiled.last_token_fraction is not None


@pytest.mark.slow
def test_layer_compiles_with_inductor():
    torch._dynamo.reset()
    ref, new = pair(moe_config())
    compiled = torch.compile(new, fullgraph=True, dynamic=False)
    assert_parity(ref, compiled, torch.randn(2, 8, 64), tol=1e-5)


def test_no_recompilation_across_training_steps():
    from torch._dynamo.utils import counters

    from worker.gqa import use_gqa_attention

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    config = moe_config()
    model = litgpt.GPT(config)
    swap_moe_layers(model, router_losses=True)
    use_gqa_attention(model)
    # the engine's defaults: compile_dynamic: true; fullgraph here to prove there is no graph break
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend="aot_eager")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(seed: int) -> float:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, config.vocab_size, (2, 16), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = compiled(idx)
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), idx.roll(-1, 1).reshape(-1)
        )
        aux, z = collect_aux_losses(model)
        (loss + 0.01 * aux + 0.001 * z).backward()
        optimizer.step()
        optimizer.zero_grad()
        collect_router_stats(model)
        return loss.item()

    step(0)
    graphs_after_first = counters["stats"]["unique_graphs"]
    assert graphs_after_first == 1  # fullgraph: one graph for the whole model
    with torch._dynamo.config.patch(error_on_recompile=True):
        losses = [step(s) for s in range(1, 5)]
    assert counters["stats"]["unique_graphs"] == graphs_after_first
    assert all(math.isfinite(v) for v in losses)


# ------------------------------------------------------------------------------------------
# router telemetry and losses
# ------------------------------------------------------------------------------------------
def test_router_losses_match_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0], [1.0, -2.0, 0.0], [0.0, 1.0, 1.5]])
    k = 2
    n_tok, n_exp = logits.shape
    chosen = [sorted(range(n_exp), key=lambda e: -row[e])[:k] for row in logits.tolist()]
    f = [sum(e in c for c in chosen) / (n_tok * k) for e in range(n_exp)]
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    p_mean = [sum(p[e] for p in probs) / n_tok for e in range(n_exp)]
    aux_hand = n_exp * sum(fi * pi for fi, pi in zip(f, p_mean, strict=False))
    z_hand = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / n_tok

    aux, z = router_losses(logits, torch.tensor(f))
    assert aux.item() == pytest.approx(aux_hand, rel=1e-6)
    assert z.item() == pytest.approx(z_hand, rel=1e-6)
    # balanced routing with uniform probabilities gives exactly 1
    aux_uniform, _ = router_losses(torch.zeros(8, 4), torch.full((4,), 0.25))
    assert aux_uniform.item() == pytest.approx(1.0)


def test_layer_router_losses_and_fraction_from_real_forward():
    config = moe_config()
    _, new = pair(config)
    x = torch.randn(2, 10, 64)
    new(x)
    assert new.last_aux_loss is None and new.last_z_loss is None  # off by default: no extra work
    new.router_losses = True
    new(x)
    logits = new.gate(x.reshape(-1, 64))
    indices = logits.topk(2).indices
    f = torch.stack([(indices == e).sum() for e in range(4)]).float() / indices.numel()
    assert torch.allclose(new.last_token_fraction, f)
    aux, z = router_losses(logits, f)
    assert torch.allclose(new.last_aux_loss, aux) and torch.allclose(new.last_z_loss, z)
    new.last_aux_loss.backward()
    assert new.gate.weight.grad is not None and new.gate.weight.grad.abs().sum() > 0


def test_model_helpers_and_stock_telemetry_agree():
    torch.manual_seed(0)
    config = moe_config(n_layer=3)
    stock = litgpt.GPT(config)
    ours = copy.deepcopy(stock)
    swap_moe_layers(ours)
    idx = torch.randint(0, config.vocab_size, (2, 12))
    with pytest.raises(RuntimeError, match="no router statistics"):
        collect_router_stats(stock)
    assert attach_router_telemetry(stock, router_losses=True) == 3
    assert attach_router_telemetry(stock, router_losses=True) == 3  # idempotent: one hook each
    assert set_router_losses(ours, True) == 3
    stock(idx)
    ours(idx)
    s_stats, o_stats = collect_router_stats(stock), collect_router_stats(ours)
    assert len(s_stats) == len(o_stats) == 3
    for a, b in zip(s_stats, o_stats, strict=True):
        assert torch.equal(a, b) and a.shape == (4,)
    (sa, sz), (oa, oz) = collect_aux_losses(stock), collect_aux_losses(ours)
    assert torch.allclose(sa, oa) and torch.allclose(sz, oz)
    assert sa.item() > 0 and sz.item() > 0
    set_router_losses(ours, False)
    ours(idx)
    with pytest.raises(RuntimeError, match="enable them first"):
        collect_aux_losses(ours)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="backend"):
        GroupedMoE(moe_config(), backend="triton")
    grouped_router = moe_config(
        n_expert=8, n_expert_groups=4, n_topk_groups=2, n_topk_scores_per_group=1
    )
    with pytest.raises(ValueError, match="router logits"):
        GroupedMoE(grouped_router, router_losses=True)
    with pytest.raises(RuntimeError, match="no MoE layer"):
        collect_aux_losses(torch.nn.Linear(2, 2))
