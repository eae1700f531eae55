"""A grouped-GEMM Mixture-of-Experts layer that is a drop-in for LitGPT's ``LLaMAMoE``.

Stock ``litgpt.model.LLaMAMoE`` (0.5.13) loops over the experts in Python; each iteration builds a
boolean mask, calls ``torch.where`` (a host synchronisation with a data-dependent shape), gathers
the routed tokens and runs three ``nn.Linear`` layers. :class:`GroupedMoE` routes the tokens in
exactly the same way (same gate ``nn.Linear``, same ``torch.topk``, softmax over the chosen k in
float32 then cast to the input dtype, same ``routed_scaling_factor``, same shared experts) but
computes every expert at once:

1. the ``N * k`` (token, expert) assignments are sorted by expert with a stable ``argsort``,
2. the tokens are gathered in that order (one ``index_select``),
3. ``fc_1``, ``fc_2`` and, after the SiLU gating, ``proj`` of all experts run as three grouped
   GEMMs (``torch._grouped_mm`` with cumulative int32 row offsets),
4. the outputs, weighted by the routing probabilities, go back with one ``index_add``.

On CUDA each expert's rows are padded to a multiple of 16 bytes' worth of rows (8 in bf16) with
static shapes (zero rows of weight 0), as PyTorch's grouped GEMM kernel wants aligned group
boundaries in the weight-gradient product (see :meth:`GroupedMoE.group_alignment`).

With the ``"grouped_mm"`` and ``"dense"`` backends nothing in the forward pass reads a tensor value on
the host and every shape depends only on the input's shape, so ``torch.compile(fullgraph=True)``
captures the layer and CUDA graphs can replay it (``"grouped_mm_sync"`` compiles with
``fullgraph=True`` too, but reads the offsets on the host).

The parameters stay LitGPT's modules (``gate``, ``experts.{i}.fc_1`` / ``fc_2`` / ``proj``,
``shared_experts``), so ``state_dict()`` keys, parameter order, initialisation and optimizer state
are identical to stock LitGPT and checkpoints load both ways. The per-expert weights are stacked
(and cast to the autocast dtype) inside ``forward``; under ``torch.compile`` that stack and the
cast fuse into one copy, the same traffic as the weight cast autocast already does for the loop.

Backends (chosen statically from device type, compute capability, compute dtype and widths, never
from data; :func:`select_backend` is the rule, logged at model build):

- ``"grouped_mm"``: ``torch._grouped_mm``, no host synchronisation. Needs row strides that are
  multiples of 16 bytes (``n_embd`` and ``moe_intermediate_size`` divisible by 8 in bf16/fp16, by 4
  in fp32). On CUDA it is used for bf16 on compute capability 9.x/10.x (Hopper/Blackwell), where
  PyTorch has its fast CUTLASS kernel. On CPU it is used for bf16 and fp32 (PyTorch >= 2.9 has a CPU
  implementation). Under ``torch.compile`` fp32 goes through a thin custom op
  (``moejobs::grouped_mm``) because PyTorch's meta kernel for ``_grouped_mm`` only accepts bf16/fp16
  (eager mode calls the kernel directly).
- ``"grouped_mm_sync"``: the same sorted, grouped layout, each expert's contiguous row segment
  multiplied with one ``torch.mm`` (custom op ``moejobs::segment_mm``). The group offsets are copied
  to the host once per layer forward (one synchronisation, reused by the backward, instead of LitGPT's
  one per expert), so CUDA graphs cannot capture it: the engine turns them off when it is chosen
  (``compile_mode`` reduce-overhead -> default, max-autotune -> max-autotune-no-cudagraphs). Any
  dtype, any capability, no group padding. Used on CUDA for everything the fast kernel does not cover
  (fp32 and fp16 anywhere, bf16 before Hopper: V100, A100, RTX 30xx/40xx, L4, and consumer
  Blackwell 12.x) and on CPU for fp16. Same FLOPs as ``"grouped_mm"``. (Forcing ``"grouped_mm"`` there
  runs PyTorch's CUDA fallback for ``_grouped_mm``, a per-group loop that copies the offsets to the
  host in every call: nine per layer forward+backward. In the installed PyTorch 2.14 the meta kernel
  also accepts fp16 only with cuBLASLt grouped GEMM, capability 9.x-11.x and CUDA >= 13.3.)
- ``"dense"``: every expert on every token with batched matmuls, combined with a dense (N, E)
  routing-weight matrix. Static shapes, exact, ``n_expert / k`` times the expert FLOPs: chosen
  automatically only for widths that are not 16-byte aligned and for devices other than CPU/CUDA.

Router telemetry: every forward stores ``last_token_fraction`` (shape ``(n_expert,)``, float32,
detached; the share of the ``N * k`` routing assignments that went to each expert, summing to 1).
When router losses are enabled it also stores ``last_aux_loss`` and ``last_z_loss`` (scalars with
gradient). :func:`collect_router_stats` and :func:`collect_aux_losses` read them for a whole model.
The same telemetry can be attached to stock ``LLaMAMoE`` layers with
:func:`attach_router_telemetry`, so the loop implementation reports the same figures.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import litgpt
import torch
import torch.nn.functional as F
from litgpt.model import LLaMAMoE
from torch import Tensor, nn

__all__ = [
    "Backend",
    "GroupedMoE",
    "attach_router_telemetry",
    "collect_aux_losses",
    "collect_router_stats",
    "HOST_SYNC_BACKENDS",
    "grouped_mm",
    "model_backends",
    "moe_layers",
    "segment_mm",
    "router_losses",
    "select_backend",
    "set_router_losses",
    "swap_moe_layers",
]

Backend = Literal["auto", "grouped_mm", "grouped_mm_sync", "dense"]
_BACKENDS = ("auto", "grouped_mm", "grouped_mm_sync", "dense")
#: Backends that read tensor values on the host (CUDA graphs cannot capture them).
HOST_SYNC_BACKENDS = frozenset({"grouped_mm_sync"})
_NO_LOGITS = (
    "router losses need softmax router logits; LitGPT's grouped top-k router "
    "(config.n_expert_groups) has none"
)


# --------------------------------------------------------------------------------------------
# grouped GEMM
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("moejobs::grouped_mm", mutates_args=())
def _grouped_mm_op(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    # ``torch._grouped_mm`` behind an opaque op with our own fake (shape) function: PyTorch's meta
    # kernel rejects fp32 although the CPU kernel computes it exactly.
    return torch._grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _grouped_mm_fake(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    if b.dim() == 3:  # (M, K) x (E, K, N) -> (M, N)
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])  # (K, M) x (M, N) -> (E, K, N)


def _grouped_mm_setup_context(ctx, inputs, output) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _grouped_mm_backward(ctx, grad: Tensor):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _grouped_mm_op(grad, b.transpose(-2, -1), offs)  # (M, N) x (E, N, K) -> (M, K)
    if ctx.needs_input_grad[1]:
        grad_b = _grouped_mm_op(a.transpose(0, 1), grad, offs)  # (K, M) x (M, N) -> (E, K, N)
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup_context)


def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """Row-grouped matrix product ``out[rows of group g] = a[rows of group g] @ b[g]``.

    Args:
        a: ``(M, K)`` rows sorted by group, row stride a multiple of 16 bytes.
        b: ``(G, K, N)`` one matrix per group (a transposed view of ``(G, N, K)`` weights is fine).
        offs: ``(G,)`` int32, cumulative end row of each group (``offs[-1] == M``); empty groups
            are allowed (equal consecutive offsets).

    Returns:
        ``(M, N)`` in ``a``'s dtype. Differentiable with respect to ``a`` and ``b``.

    Uses ``torch._grouped_mm`` directly in eager mode and for bf16/fp16 under ``torch.compile``
    (where Inductor may pick its own kernel), and the ``moejobs::grouped_mm`` custom op for other
    dtypes under ``torch.compile``.
    Raises RuntimeError (from PyTorch) if strides are not 16-byte multiples.
    """
    if a.dtype in (torch.bfloat16, torch.float16) or not torch.compiler.is_compiling():
        return torch._grouped_mm(a, b, offs=offs)
    return _grouped_mm_op(a, b, offs)


# --------------------------------------------------------------------------------------------
# per-segment GEMM with host offsets (the "grouped_mm_sync" backend)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("moejobs::segment_mm", mutates_args=())
def _segment_mm_op(a: Tensor, b: Tensor, ends: Tensor) -> Tensor:
    # ``ends`` lives on the CPU: reading it here costs no device synchronisation.
    bounds = [0, *ends.tolist()]
    if b.dim() == 3:  # (M, K) x (G, K, N) -> (M, N)
        out = (
            a.new_zeros(a.shape[0], b.shape[-1])
            if bounds[-1] < a.shape[0]
            else a.new_empty(a.shape[0], b.shape[-1])
        )
        for g in range(b.shape[0]):
            start, end = bounds[g], bounds[g + 1]
            if end > start:
                torch.mm(a[start:end], b[g], out=out[start:end])
        return out
    out = a.new_empty(ends.shape[0], a.shape[0], b.shape[-1])  # (K, M) x (M, N) -> (G, K, N)
    for g in range(ends.shape[0]):
        start, end = bounds[g], bounds[g + 1]
        if end > start:
            torch.mm(a[:, start:end], b[start:end], out=out[g])
        else:
            out[g].zero_()  # an expert with no rows gets a zero weight gradient
    return out


@_segment_mm_op.register_fake
def _segment_mm_fake(a: Tensor, b: Tensor, ends: Tensor) -> Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(ends.shape[0], a.shape[0], b.shape[-1])


def _segment_mm_backward(ctx, grad: Tensor):
    a, b, ends = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _segment_mm_op(grad, b.transpose(-2, -1), ends)
    if ctx.needs_input_grad[1]:
        grad_b = _segment_mm_op(a.transpose(0, 1), grad, ends)
    return grad_a, grad_b, None


_segment_mm_op.register_autograd(_segment_mm_backward, setup_context=_grouped_mm_setup_context)


def segment_mm(a: Tensor, b: Tensor, ends: Tensor) -> Tensor:
    """Row-grouped matrix product like :func:`grouped_mm`, one ``torch.mm`` per non-empty group.

    Args:
        a: ``(M, K)`` rows sorted by group (any strides, any dtype ``torch.mm`` supports).
        b: ``(G, K, N)`` one matrix per group.
        ends: ``(G,)`` integer tensor **on the CPU**, cumulative end row of each group
            (``ends[-1] <= M``; rows past ``ends[-1]`` give zero output rows). Copy the device
            offsets to the host once and pass the copy to every product of a layer (forward and
            backward), so the whole layer costs one device synchronisation.

    Returns:
        ``(M, N)`` in ``a``'s dtype. Differentiable with respect to ``a`` and ``b`` (empty groups
        get zero weight gradients). Works eagerly and under ``torch.compile`` (opaque custom op).
    """
    return _segment_mm_op(a, b, ends)


def select_backend(
    device_type: str,
    capability: tuple[int, int] | None,
    dtype: torch.dtype,
    widths: tuple[int, ...],
) -> str:
    """Static choice of the expert computation: a pure function of its arguments.

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ... (ROCm builds report ``"cuda"``).
        capability: CUDA compute capability ``(major, minor)`` (``torch.cuda.get_device_capability``);
            ignored for other device types (pass None).
        dtype: the dtype the expert matmuls run in (the autocast dtype when autocast is on).
        widths: the matrix widths whose row strides must be 16-byte multiples
            (``n_embd``, ``moe_intermediate_size``).

    Returns:
        ``"grouped_mm"``: bf16 on CUDA capability 9.x/10.x; bf16/fp32 on CPU.
        ``"grouped_mm_sync"``: every other dtype/capability on CUDA, fp16 (and other float dtypes) on CPU.
        ``"dense"``: widths not 16-byte aligned for ``dtype``, or another device type.

    Raises:
        ValueError: ``device_type == "cuda"`` without a capability.
    """
    align = max(1, 16 // dtype.itemsize)
    if any(w % align for w in widths):
        return "dense"
    if device_type == "cpu":
        return "grouped_mm" if dtype in (torch.bfloat16, torch.float32) else "grouped_mm_sync"
    if device_type == "cuda":
        if capability is None:
            raise ValueError(
                "select_backend: device_type 'cuda' needs the compute capability (major, minor)"
            )
        fast = dtype == torch.bfloat16 and capability[0] in (9, 10) and torch.version.hip is None
        return "grouped_mm" if fast else "grouped_mm_sync"
    return "dense"


def device_capability(device: torch.device | str) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA device, None for any other device type."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device.index or 0)
    return major, minor


@torch.compiler.assume_constant_result
def _auto_backend(
    device_type: str, device_index: int, dtype: torch.dtype, widths: tuple[int, ...]
) -> str:
    capability = (
        device_capability(torch.device(device_type, device_index))
        if device_type == "cuda"
        else None
    )
    return select_backend(device_type, capability, dtype, widths)


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype ``nn.Linear(weight)(x)`` computes in: the autocast dtype when autocast is on."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


# --------------------------------------------------------------------------------------------
# router statistics and losses
# --------------------------------------------------------------------------------------------
def router_losses(logits: Tensor, token_fraction: Tensor) -> tuple[Tensor, Tensor]:
    """Load-balancing auxiliary loss and router z-loss of one MoE layer.

    Args:
        logits: ``(N, E)`` router logits of N tokens over E experts (any float dtype; computed in
            float32).
        token_fraction: ``(E,)`` share of the ``N * k`` routing assignments each expert received
            (sums to 1; no gradient flows through it).

    Returns:
        ``(aux, z)``, float32 scalars with gradient through ``logits``:

        - ``aux = E * sum_i f_i * P_i`` with ``f_i = token_fraction[i]`` and ``P_i`` the mean over
          tokens of the full softmax probability of expert i. Switch Transformer, Fedus et al. 2021
          (arXiv:2101.03961), eq. (4)-(6); for top-k routing ``f_i`` is the fraction of the N*k
          assignments as in Megatron-LM's switch load-balancing loss, so perfectly balanced routing
          gives 1.0 for any k (Hugging Face's Mixtral ``load_balancing_loss_func`` counts a token
          once per chosen expert, which gives k times this value).
        - ``z = mean_tokens(logsumexp(logits)^2)``: router z-loss, ST-MoE, Zoph et al. 2022
          (arXiv:2202.08906), eq. (5).
    """
    logits = logits.float()
    n_expert = logits.shape[-1]
    mean_prob = logits.softmax(dim=-1).mean(dim=0)  # (E,)
    aux = n_expert * torch.sum(token_fraction.detach().float() * mean_prob)
    z = torch.logsumexp(logits, dim=-1).square().mean()
    return aux, z


def _expert_counts(flat_indices: Tensor, n_expert: int) -> Tensor:
    """``(E,)`` int64 number of assignments per expert, with a static output shape."""
    counts = torch.zeros(n_expert, dtype=torch.int64, device=flat_indices.device)
    return counts.scatter_add_(0, flat_indices, torch.ones_like(flat_indices))


def _record_router_stats(
    module: Any, logits: Tensor | None, counts: Tensor, n_assignments: int
) -> None:
    """Store the last forward's telemetry (and router losses when enabled) on ``module``."""
    fraction = counts.detach().float() / n_assignments
    module.last_token_fraction = fraction
    if getattr(module, "router_losses", False):
        if logits is None:
            raise ValueError(_NO_LOGITS)
        module.last_aux_loss, module.last_z_loss = router_losses(logits, fraction)
    else:
        module.last_aux_loss = module.last_z_loss = None


# --------------------------------------------------------------------------------------------
# the layer
# --------------------------------------------------------------------------------------------
class GroupedMoE(LLaMAMoE):
    """Drop-in replacement for ``litgpt.model.LLaMAMoE`` computing the experts with grouped GEMMs.

    Args:
        config: the ``litgpt.Config`` (needs ``n_expert``, ``n_expert_per_token``,
            ``moe_intermediate_size``; honours ``bias``, ``routed_scaling_factor``,
            ``n_shared_expert`` and LitGPT's grouped top-k router ``n_expert_groups``).
        backend: ``"auto"`` (default; :func:`select_backend`), ``"grouped_mm"``,
            ``"grouped_mm_sync"`` or ``"dense"``.
        router_losses: compute the auxiliary and z losses in every forward (see
            :func:`router_losses`); off by default, the engine turns it on when a coefficient > 0.

    Forward: ``x`` of shape ``(B, T, n_embd)`` -> ``(B, T, n_embd)`` in ``x``'s dtype, numerically
    the same function as ``LLaMAMoE.forward`` (up to floating-point summation order).

    After each forward: ``last_token_fraction`` ``(n_expert,)`` float32, detached;
    ``last_aux_loss`` / ``last_z_loss`` float32 scalars or None. These are the outputs of the last
    forward only: read (or ``.clone()``) them before the next forward, which replaces them (and
    under CUDA graphs overwrites their memory).

    Raises:
        ValueError: unknown backend; the config has no experts.
    """

    def __init__(
        self, config: litgpt.Config, backend: Backend = "auto", router_losses: bool = False
    ) -> None:
        if not config.n_expert or not config.n_expert_per_token:
            raise ValueError(
                "GroupedMoE needs config.n_expert > 0 and config.n_expert_per_token > 0"
            )
        super().__init__(config)
        self._init_extra(backend, router_losses)

    def _init_extra(self, backend: str, router_losses: bool) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if router_losses and self.config.n_expert_groups:
            raise ValueError(_NO_LOGITS)
        self.backend = backend
        self.group_align: int | None = None
        self.router_losses = bool(router_losses)
        self.last_token_fraction: Tensor | None = None
        self.last_aux_loss: Tensor | None = None
        self.last_z_loss: Tensor | None = None

    @classmethod
    def from_llama_moe(
        cls, moe: LLaMAMoE, backend: Backend = "auto", router_losses: bool = False
    ) -> GroupedMoE:
        """Wrap the submodules (and so the very parameter tensors) of an existing ``LLaMAMoE``.

        No weights are copied or re-initialised; ``moe`` should not be used afterwards.
        """
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.gate = moe.gate
        new.experts = moe.experts
        if moe.config.n_shared_expert:
            new.shared_experts = moe.shared_experts
        new.config = moe.config
        new.train(moe.training)
        new._init_extra(backend, router_losses)
        return new

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, router_losses={self.router_losses}"

    # -- routing: identical expressions to LLaMAMoE.forward --------------------------------
    def _route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        if not self.config.n_expert_groups:
            logits = self.gate(x)  # (N, E)
            probs, indices = torch.topk(logits, self.config.n_expert_per_token)  # (N, k)
            probs = probs.softmax(dim=1, dtype=torch.float).to(dtype=x.dtype)
        else:
            logits = None
            probs, indices = self.gate(x)
        if self.config.routed_scaling_factor != 1.0:
            probs = probs * self.config.routed_scaling_factor
        return probs, indices, logits

    def _stacked(
        self, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor, Tensor] | None]:
        """Expert weights stacked as ``w1, w2 (E, I, C)`` (fc_1, fc_2) and ``w3 (E, C, I)`` (proj),
        each cast to ``dtype`` before stacking (one copy of each weight); the three stacked biases
        ``(E, I), (E, I), (E, C)`` when ``config.bias``, else None."""
        experts = self.experts
        w1 = torch.stack([e.fc_1.weight.to(dtype) for e in experts])
        w2 = torch.stack([e.fc_2.weight.to(dtype) for e in experts])
        w3 = torch.stack([e.proj.weight.to(dtype) for e in experts])
        biases = None
        if self.config.bias:
            b1, b2, b3 = (
                torch.stack([getattr(e, n).bias.to(dtype) for e in experts])
                for n in ("fc_1", "fc_2", "proj")
            )
            biases = (b1, b2, b3)
        return w1, w2, w3, biases

    def resolved_backend(self, x: Tensor) -> str:
        """The backend a forward on ``x`` (under the current autocast state) would use."""
        if self.backend != "auto":
            return self.backend
        dtype = _compute_dtype(x, self.experts[0].fc_1.weight)
        widths = (self.config.n_embd, self.config.moe_intermediate_size)
        return _auto_backend(x.device.type, x.device.index or 0, dtype, widths)

    def group_alignment(self, x: Tensor, dtype: torch.dtype, backend: str = "grouped_mm") -> int:
        """Rows each expert's group is padded to a multiple of (static): ``self.group_align`` when
        set, else 16 bytes' worth of ``dtype`` elements for ``"grouped_mm"`` on CUDA and 1 (no
        padding) elsewhere (``"grouped_mm_sync"`` multiplies row slices with ``torch.mm``, which
        takes any boundary).

        PyTorch's CUDA grouped GEMM kernel needs 16-byte-aligned group boundaries along the token
        dimension when that dimension is the contiguous one (the weight-gradient GEMM contracts
        over tokens); torchtitan pads token groups to 8 rows for bf16 for the same reason. The CPU
        kernel has no such requirement (tested with arbitrary group sizes)."""
        if self.group_align is not None:
            return self.group_align
        return (
            max(1, 16 // dtype.itemsize)
            if x.device.type == "cuda" and backend == "grouped_mm"
            else 1
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T, C)`` -> ``(B, T, C)``; see the class docstring."""
        B, T, C = x.size()
        x2 = x.reshape(-1, C)  # (N, C)
        N, k, E = x2.shape[0], self.config.n_expert_per_token, self.config.n_expert
        probs, indices, logits = self._route(x2)  # (N, k), (N, k)
        flat = indices.reshape(-1)  # (N*k,), assignment a = token * k + slot
        counts = _expert_counts(flat, E)
        _record_router_stats(self, logits, counts, N * k)

        dtype = _compute_dtype(x2, self.experts[0].fc_1.weight)
        weights = self._stacked(dtype)
        backend = self.resolved_backend(x2)
        if backend in ("grouped_mm", "grouped_mm_sync"):
            y = self._grouped(x2, dtype, probs, flat, counts, *weights, backend=backend)
        else:
            y = self._dense(x2, dtype, probs, indices, *weights)
        y = y.view(B, T, C)
        if self.config.n_shared_expert:
            y = y + self.shared_experts(x)
        return y

    def _grouped(
        self, x2, dtype, probs, flat, counts, w1, w2, w3, biases, backend="grouped_mm"
    ) -> Tensor:
        N, C = x2.shape
        E, k = self.config.n_expert, self.config.n_expert_per_token
        M = N * k
        order = torch.argsort(flat, stable=True)  # assignments sorted by expert, token order kept
        token = order // k  # (M,) source token of each sorted assignment
        row_prob = probs.reshape(-1).index_select(0, order)  # (M,)
        offs = counts.cumsum(0)  # (E,) cumulative end row of each expert
        align = self.group_alignment(x2, dtype, backend)
        x_src = x2.to(dtype)
        if align == 1:
            row_token, n_src = token, N
        else:
            # Pad every expert's group to a multiple of ``align`` rows. Padding rows read an extra
            # all-zero source row (index N) and carry weight 0; the last group also takes the
            # slack, so the last offset is the static row count, M + E * (align - 1) rounded up.
            padded = (counts + (align - 1)) // align * align
            starts = torch.cumsum(padded, 0) - padded
            shift = starts - (offs - counts)  # (E,) how far each group moves
            pos = torch.arange(M, device=x2.device) + shift.index_select(
                0, flat.index_select(0, order)
            )
            rows = (M + E * (align - 1) + align - 1) // align * align
            offs = torch.cat([starts[1:], torch.full_like(starts[:1], rows)])
            row_token = torch.full((rows,), N, dtype=token.dtype, device=x2.device).scatter(
                0, pos, token
            )
            row_prob = row_prob.new_zeros(rows).scatter(0, pos, row_prob)
            x_src = torch.cat([x_src, x_src.new_zeros(1, C)])
            n_src = N + 1
        offs = offs.to(torch.int32)
        if backend == "grouped_mm_sync":
            ends = offs.to("cpu")  # the layer's one host synchronisation, shared by all six GEMMs
            mm = lambda a, b: segment_mm(a, b, ends)  # noqa: E731
        else:
            mm = lambda a, b: grouped_mm(a, b, offs)  # noqa: E731
        xs = x_src.index_select(0, row_token)  # (rows, C), grouped by expert
        h1 = mm(xs, w1.transpose(-2, -1))  # (rows, I)
        h2 = mm(xs, w2.transpose(-2, -1))
        if biases is not None:
            rows_idx = torch.arange(xs.shape[0], device=x2.device, dtype=offs.dtype)
            expert = torch.searchsorted(offs, rows_idx, right=True).clamp_(max=E - 1)
            h1 = h1 + biases[0].index_select(0, expert)
            h2 = h2 + biases[1].index_select(0, expert)
        out = mm(F.silu(h1) * h2, w3.transpose(-2, -1))  # (rows, C)
        if biases is not None:
            out = out + biases[2].index_select(0, expert)
        weighted = row_prob.unsqueeze(-1) * out
        y = torch.zeros(n_src, C, dtype=x2.dtype, device=x2.device)
        y = y.index_add_(0, row_token, weighted.to(x2.dtype))
        return y if n_src == N else y[:N]

    def _dense(self, x2, dtype, probs, indices, w1, w2, w3, biases) -> Tensor:
        N = x2.shape[0]
        E = self.config.n_expert
        xc = x2.to(dtype).unsqueeze(0)  # (1, N, C), broadcast over experts
        h1 = torch.matmul(xc, w1.transpose(-2, -1))  # (E, N, I)
        h2 = torch.matmul(xc, w2.transpose(-2, -1))
        if biases is not None:
            h1 = h1 + biases[0].unsqueeze(1)
            h2 = h2 + biases[1].unsqueeze(1)
        out = torch.bmm(F.silu(h1) * h2, w3.transpose(-2, -1))  # (E, N, C)
        if biases is not None:
            out = out + biases[2].unsqueeze(1)
        combine = torch.zeros(N, E, dtype=probs.dtype, device=x2.device).scatter(
            1, indices, probs
        )  # (N, E)
        weighted = combine.t().unsqueeze(-1) * out  # (E, N, C)
        return weighted.sum(dim=0).to(x2.dtype)


# --------------------------------------------------------------------------------------------
# model-level helpers
# --------------------------------------------------------------------------------------------
def swap_moe_layers(
    model: nn.Module, *, backend: Backend = "auto", router_losses: bool = False
) -> int:
    """Replace every stock ``LLaMAMoE`` in ``model`` (e.g. a ``litgpt.GPT``) by a :class:`GroupedMoE`.

    The new layers reuse the old submodules, so parameters (and their identity, device, dtype,
    ``requires_grad``), ``state_dict()`` keys and parameter order are unchanged. Subclasses of
    ``LLaMAMoE`` (LitGPT's LoRA/adapter variants) and existing ``GroupedMoE`` are left alone.
    Call it before ``torch.compile`` / ``fabric.setup`` and before building the optimizer (the
    latter is not required, the parameters are the same objects).

    Args:
        model: any ``nn.Module``.
        backend, router_losses: passed to :class:`GroupedMoE`.

    Returns:
        The number of layers replaced (0 for a dense model).
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is LLaMAMoE:
                setattr(parent, name, GroupedMoE.from_llama_moe(child, backend, router_losses))
                replaced += 1
    return replaced


def moe_layers(model: nn.Module) -> Iterator[Any]:
    """The ``LLaMAMoE`` layers (stock and :class:`GroupedMoE`) of ``model`` in module order
    (typed Any: LitGPT's layers carry no type information)."""
    return (m for m in model.modules() if isinstance(m, LLaMAMoE))


def model_backends(
    model: nn.Module, device: torch.device | str, dtype: torch.dtype
) -> dict[str, int]:
    """The expert backend each :class:`GroupedMoE` of ``model`` will use on ``device`` with expert
    matmuls in ``dtype`` (the autocast dtype under mixed precision): ``{backend: number of layers}``,
    empty for a model without grouped MoE layers. Queries the device's capability, runs nothing."""
    device = torch.device(device)
    capability = device_capability(device)
    found: dict[str, int] = {}
    for moe in moe_layers(model):
        if isinstance(moe, GroupedMoE):
            widths = (moe.config.n_embd, moe.config.moe_intermediate_size)
            name = (
                moe.backend
                if moe.backend != "auto"
                else select_backend(device.type, capability, dtype, widths)
            )
            found[name] = found.get(name, 0) + 1
    return found


def _stock_gate_hook(moe: LLaMAMoE):
    def hook(gate: nn.Module, inputs: tuple, logits: Tensor) -> None:
        # Same top-k as LLaMAMoE.forward on the same logits, so the same experts.
        indices = torch.topk(logits, moe.config.n_expert_per_token).indices
        counts = _expert_counts(indices.reshape(-1), moe.config.n_expert)
        _record_router_stats(moe, logits, counts, indices.numel())

    return hook


def attach_router_telemetry(model: nn.Module, router_losses: bool = False) -> int:
    """Give stock ``LLaMAMoE`` layers the telemetry of :class:`GroupedMoE`.

    Registers a forward hook on each stock layer's gate ``nn.Linear`` that recomputes the (cheap)
    top-k of the gate logits and stores ``last_token_fraction`` (and the router losses when
    ``router_losses``) on the layer, so :func:`collect_router_stats` / :func:`collect_aux_losses`
    work for ``optimization.moe_implementation: loop`` too. Layers with LitGPT's grouped top-k
    router (``n_expert_groups``) are skipped. Idempotent.

    Returns:
        The number of layers instrumented (already instrumented ones included).
    """
    n = 0
    for moe in moe_layers(model):
        if isinstance(moe, GroupedMoE) or moe.config.n_expert_groups:
            continue
        moe.router_losses = bool(router_losses)
        if getattr(moe, "_telemetry_handle", None) is None:
            moe.last_token_fraction = moe.last_aux_loss = moe.last_z_loss = None
            moe._telemetry_handle = moe.gate.register_forward_hook(_stock_gate_hook(moe))
        n += 1
    return n


def set_router_losses(model: nn.Module, enabled: bool) -> int:
    """Turn the router loss computation on or off in every instrumented MoE layer.

    Do it before ``torch.compile`` (the flag is a compile-time constant; changing it later
    triggers one recompilation). Returns the number of layers changed.
    """
    n = 0
    for moe in moe_layers(model):
        if hasattr(moe, "last_token_fraction"):
            if enabled and moe.config.n_expert_groups:
                raise ValueError(_NO_LOGITS)
            moe.router_losses = bool(enabled)
            n += 1
    return n


def collect_router_stats(model: nn.Module) -> list[Tensor]:
    """Per-expert token fractions of the last forward, one ``(n_expert,)`` float32 tensor per MoE
    layer in layer order (index = layer number among the MoE layers).

    Each tensor is the share of that layer's ``N * k`` routing assignments that each expert
    received (sums to 1; uniform routing gives ``1 / n_expert``). The tensors stay on the model's
    device (no host synchronisation here); ``torch.stack(...).tolist()`` when logging.

    Raises:
        RuntimeError: a MoE layer has no telemetry (a stock layer without
            :func:`attach_router_telemetry`, or no forward has run yet).
    """
    stats = []
    for i, moe in enumerate(moe_layers(model)):
        fraction = getattr(moe, "last_token_fraction", None)
        if fraction is None:
            raise RuntimeError(
                f"MoE layer {i} has no router statistics: run a forward first "
                "(and call attach_router_telemetry for stock LLaMAMoE layers)"
            )
        stats.append(fraction)
    return stats


def collect_aux_losses(model: nn.Module) -> tuple[Tensor, Tensor]:
    """Mean over MoE layers of the last forward's load-balancing loss and router z-loss.

    The engine adds ``train.moe_aux_loss_coef * aux + train.moe_z_loss_coef * z`` to the language
    model loss of the same forward (before ``backward``). Formulas and sources: :func:`router_losses`.
    Averaging over layers keeps a balanced model at ``aux == 1.0`` whatever its depth.

    Returns:
        ``(aux, z)`` float32 scalars with gradient.

    Raises:
        RuntimeError: the model has no MoE layer, or router losses were not enabled
            (``swap_moe_layers(..., router_losses=True)``, :func:`set_router_losses` or
            :func:`attach_router_telemetry(..., router_losses=True)`) before the last forward.
    """
    aux, z = [], []
    for i, moe in enumerate(moe_layers(model)):
        a, b = getattr(moe, "last_aux_loss", None), getattr(moe, "last_z_loss", None)
        if a is None or b is None:
            raise RuntimeError(
                f"MoE layer {i} computed no router losses in its last forward; enable them first"
            )
        aux.append(a)
        z.append(b)
    if not aux:
        raise RuntimeError("the model has no MoE layer")
    return torch.stack(aux).mean(), torch.stack(z).mean()
