"""MoE expert backends: the selection rule per device capability and dtype (pure, no GPU needed), the
host-offset "grouped_mm_sync" path's numerics on the CPU, and the engine's CUDA-graph switch."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
litgpt = pytest.importorskip("litgpt")

from tests.worker.moe.test_moe import assert_parity, moe_config, pair, rel_err  # noqa: E402
from worker.moe import (  # noqa: E402
    HOST_SYNC_BACKENDS,
    GroupedMoE,
    model_backends,
    segment_mm,
    select_backend,
    swap_moe_layers,
)
from worker.train import effective_compile_mode, expert_dtype, moe_backend_notes  # noqa: E402

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
ALIGNED = (768, 2048)  # MoE-200M widths
CUDA_GPUS = {  # capability: a card with it
    (7, 0): "V100",
    (8, 0): "A100",
    (8, 6): "RTX 3090",
    (8, 9): "L4 / RTX 4090",
    (9, 0): "H100 / H200",
    (10, 0): "B200",
    (12, 0): "RTX 5090",
}
HIP = torch.version.hip is not None


# ------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability", list(CUDA_GPUS), ids=[f"sm{a}{b}" for a, b in CUDA_GPUS])
@pytest.mark.parametrize("dtype", [BF16, FP16, FP32], ids=["bf16", "fp16", "fp32"])
def test_cuda_selection_never_dense_for_aligned_widths(capability, dtype):
    got = select_backend("cuda", capability, dtype, ALIGNED)
    fast = dtype == BF16 and capability[0] in (9, 10) and not HIP
    assert got == ("grouped_mm" if fast else "grouped_mm_sync"), CUDA_GPUS[capability]


@pytest.mark.parametrize("capability", [None, *CUDA_GPUS])
@pytest.mark.parametrize(
    "dtype,widths", [(BF16, (768, 2044)), (FP16, (764, 2048)), (FP32, (766, 2048))]
)
def test_unaligned_widths_are_dense_everywhere(capability, dtype, widths):
    device = "cpu" if capability is None else "cuda"
    assert select_backend(device, capability, dtype, widths) == "dense"


@pytest.mark.parametrize(
    "dtype,expected", [(BF16, "grouped_mm"), (FP32, "grouped_mm"), (FP16, "grouped_mm_sync")]
)
def test_cpu_selection(dtype, expected):
    assert select_backend("cpu", None, dtype, ALIGNED) == expected
    assert select_backend("cpu", (9, 0), dtype, ALIGNED) == expected  # capability ignored off CUDA


def test_selection_needs_the_capability_on_cuda_and_is_dense_on_other_devices():
    with pytest.raises(ValueError, match="capability"):
        select_backend("cuda", None, BF16, ALIGNED)
    assert select_backend("mps", None, FP32, ALIGNED) == "dense"
    assert select_backend("xpu", None, BF16, ALIGNED) == "dense"
    assert HOST_SYNC_BACKENDS == {"grouped_mm_sync"}


# ------------------------------------------------------------------------------------------
# segment_mm (the grouped_mm_sync GEMM) against a per-group float64 reference
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,tol", [(FP32, 1e-6), (BF16, 1e-2), (FP16, 2e-3)], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("tail", [0, 3], ids=["exact", "trailing-rows"])
def test_segment_mm_matches_per_group_matmul(dtype, tol, tail):
    torch.manual_seed(0)
    counts = [0, 5, 0, 11, 3]  # empty and odd-sized groups: no alignment needed
    ends = torch.tensor(counts).cumsum(0)
    m = sum(counts) + tail
    a = torch.randn(m, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(len(counts), 24, 16, dtype=dtype, requires_grad=True)
    out = segment_mm(a, w.transpose(-2, -1), ends)
    grad = torch.randn_like(out)
    ga, gw = torch.autograd.grad(out, [a, w], grad)

    a2, w2 = a.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    pieces, start = [], 0
    for g, n in enumerate(counts):
        pieces.append(a2[start : start + n] @ w2[g].T)
        start += n
    pieces.append(a2[start:] * 0.0 @ w2[0].T)  # rows past the last group: zero output
    ref = torch.cat(pieces)
    ga_ref, gw_ref = torch.autograd.grad(ref, [a2, w2], grad.double())
    assert out.dtype == dtype and out.shape == (m, 24)
    assert rel_err(out, ref) < tol
    assert rel_err(ga, ga_ref) < tol
    assert rel_err(gw, gw_ref) < tol
    assert gw[0].abs().sum() == 0 and gw[2].abs().sum() == 0  # empty experts get zero gradient
    if tail:
        assert out[-tail:].abs().sum() == 0 and ga[-tail:].abs().sum() == 0


def test_segment_mm_custom_op_registrations_are_consistent():
    a = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(3, 8, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.moejobs.segment_mm.default, (a, w, torch.tensor([2, 2, 12])))


# ------------------------------------------------------------------------------------------
# the layer on grouped_mm_sync (fp32 / bf16 parity is in tests/worker/moe/test_moe.py's parametrisation)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_sync_layer_parity_fp16_true(k, bias):
    ref, new = pair(
        moe_config(n_expert_per_token=k, bias=bias), dtype=FP16, backend="grouped_mm_sync"
    )
    assert_parity(ref, new, torch.randn(2, 13, 64, dtype=FP16), tol=5e-3)


def test_sync_layer_never_pads_groups():
    _, new = pair(moe_config(), backend="grouped_mm_sync")
    x = torch.randn(1, 3, 64)
    assert new.group_alignment(x, BF16, "grouped_mm_sync") == 1
    assert new.group_alignment(x, BF16, "grouped_mm") == 1  # CPU: no padding for either


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-mixed"])
def test_sync_layer_compiles_fullgraph_and_matches_eager(autocast):
    torch._dynamo.reset()
    ref, new = pair(moe_config(bias=True), backend="grouped_mm_sync")
    compiled = torch.compile(new, fullgraph=True, dynamic=True, backend="aot_eager")
    assert_parity(
        ref,
        compiled,
        torch.randn(2, 11, 64),
        tol=1e-2 if autocast else 1e-5,
        autocast_dtype=BF16 if autocast else None,
    )


@pytest.mark.slow
def test_sync_layer_compiles_with_inductor():
    # Inductor codegen around the opaque segment_mm op and the offsets' copy to the host
    torch._dynamo.reset()
    ref, new = pair(moe_config(bias=True), backend="grouped_mm_sync")
    compiled = torch.compile(new, fullgraph=True, dynamic=False)
    assert_parity(ref, compiled, torch.randn(2, 8, 64), tol=1e-5)


def test_auto_backend_on_cpu_fp16_is_the_sync_path():
    ref, new = pair(moe_config(), dtype=FP16)
    x = torch.randn(2, 7, 64, dtype=FP16)
    assert new.resolved_backend(x) == "grouped_mm_sync"
    assert_parity(ref, new, x, tol=5e-3)


# ------------------------------------------------------------------------------------------
# engine: what is logged and the CUDA-graph switch
# ------------------------------------------------------------------------------------------
def test_model_backends_and_notes_on_cpu():
    torch.manual_seed(0)
    model = litgpt.GPT(moe_config())
    assert model_backends(model, "cpu", FP32) == {}  # stock layers: nothing to choose
    swap_moe_layers(model)
    assert model_backends(model, "cpu", FP32) == {"grouped_mm": 2}
    notes: list[str] = []
    assert moe_backend_notes(model, torch.device("cpu"), BF16, notes) is None
    assert notes == ["MoE expert backend on cpu, bfloat16: grouped_mm (2 layers)"]

    notes.clear()
    reason = moe_backend_notes(model, "cpu", FP16, notes)
    assert notes[0] == "MoE expert backend on cpu, float16: grouped_mm_sync (2 layers)"
    assert reason and "grouped_mm_sync" in reason and "host" in reason

    model.transformer.h[0].mlp.backend = "dense"
    notes.clear()
    assert moe_backend_notes(model, "cpu", FP32, notes) is None
    assert notes[0] == "MoE expert backend on cpu, float32: dense (1 layer), grouped_mm (1 layer)"
    assert "every expert on every token" in notes[1]
    assert isinstance(model.transformer.h[1].mlp, GroupedMoE)


@pytest.mark.parametrize(
    "mode,device,reason,expected",
    [
        ("reduce-overhead", "cuda", "sync", None),
        ("max-autotune", "cuda", "sync", "max-autotune-no-cudagraphs"),
        ("reduce-overhead", "cuda", None, "reduce-overhead"),
        ("reduce-overhead", "cpu", "sync", "reduce-overhead"),  # no CUDA graphs on a CPU anyway
        ("default", "cuda", "sync", None),
        ("max-autotune-no-cudagraphs", "cuda", "sync", "max-autotune-no-cudagraphs"),
    ],
)
def test_effective_compile_mode_turns_cuda_graphs_off_for_host_sync(mode, device, reason, expected):
    got, line = effective_compile_mode(mode, device, reason)
    assert got == expected
    changed = (
        device == "cuda" and reason is not None and mode in ("reduce-overhead", "max-autotune")
    )
    assert (line is not None) == changed
    if changed:
        assert line.startswith(
            f"compile_mode {mode} -> {expected or 'default'} (CUDA graphs off): sync"
        )


@pytest.mark.parametrize(
    "precision,device,expected",
    [
        ("bf16-mixed", "cuda", BF16),
        ("bf16-true", "cpu", BF16),
        ("16-mixed", "cuda", FP16),
        ("16-mixed", "cpu", BF16),
        ("16-true", "cuda", FP16),
        ("32-true", "cuda", FP32),
    ],
)
def test_expert_dtype(precision, device, expected):
    assert expert_dtype(precision, device) == expected
