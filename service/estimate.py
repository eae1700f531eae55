"""Resource estimates for a validated config pair: parameters, FLOPs, memory, checkpoint size and
time (pure Python: no torch, no litgpt). The plan they are computed for (micro-batches,
optimizer steps, tokens) is ``service.config.plan``'s.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from service import contract
from service.config.model import ModelConfig
from service.config.plan import TrainingPlan, training_plan
from service.config.train import TrainConfig

__all__ = [
    "ParamCounts",
    "count_parameters",
    "MemoryEstimate",
    "DEVICE_KINDS",
    "activation_bytes",
    "attention_flops_per_token",
    "Estimate",
    "estimate",
    "GPU_PEAK_FLOPS",
    "DEFAULT_MFU",
]


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of ``litgpt.GPT(config)`` derived from the config alone.

    Attributes:
        total: every parameter, as ``litgpt.utils.num_parameters(GPT(config))`` counts it (shared tensors
            once: with tie_embeddings the embedding and LM head are one matrix).
        embedding: the token-embedding matrix (padded_vocab_size x n_embd).
        lm_head: the LM head weight (+ bias); 0 when tied (it is the embedding matrix).
        norms: all normalisation weights/biases.
        attention: all attention projections (all layers).
        router: MoE gates (all layers).
        experts: all routed experts (all layers).
        dense_mlp: dense MLPs, shared experts included (all layers).
        active: parameters one token uses: total minus the experts it is not routed to
            ((n_expert - n_expert_per_token) experts per MoE layer).
        active_matmul: weights of the matrix multiplies one token goes through (attention projections,
            router, its n_expert_per_token experts, shared/dense MLPs, LM head); no embedding lookup,
            norms or biases. The ``N`` of FLOPs = 6N.
        expert_size: parameters of one routed expert.
        moe_layers: number of MoE layers.
    """

    total: int
    embedding: int
    lm_head: int
    norms: int
    attention: int
    router: int
    experts: int
    dense_mlp: int
    active: int
    active_matmul: int
    expert_size: int
    moe_layers: int


def _norm_params(model: ModelConfig, size: int) -> int:
    if model.norm_class_name == "RMSNorm":
        return size
    if "OLMo" in model.name:  # litgpt uses LayerNorm(elementwise_affine=False) for OLMo
        return 0
    return 2 * size  # LayerNorm weight + bias


def _linear(n_in: int, n_out: int, bias: bool) -> tuple[int, int]:
    """(weight, bias) parameter counts of nn.Linear(n_in, n_out, bias)."""
    return n_in * n_out, (n_out if bias else 0)


def _mlp(model: ModelConfig, kind: str, width: int) -> tuple[int, int]:
    """(weights, biases) of one MLP of ``kind`` with intermediate ``width``."""
    c, b = model.n_embd, model.bias
    if kind == "GptNeoxMLP":
        parts = [_linear(c, width, b), _linear(width, c, b)]
    else:  # LLaMAMLP / GemmaMLP: fc_1, fc_2, proj
        parts = [_linear(c, width, b), _linear(c, width, b), _linear(width, c, b)]
    return sum(w for w, _ in parts), sum(x for _, x in parts)


def count_parameters(model: ModelConfig, tie_embeddings: bool = False) -> ParamCounts:
    """Count ``litgpt.GPT(config)``'s parameters from the config (LitGPT 0.5.13 ``model.py``), no torch.

    Covers: embedding and LM head with padded_vocab_size (lm_head_bias), LayerNorm (weight+bias; none for
    OLMo names) / RMSNorm (weight), norm_1/norm_2/post-norms/shared_attention_norm, QK-norm, qkv with GQA
    ((n_head + 2 n_query_groups) x head_size outputs, bias if bias or attn_bias), latent attention, the
    output projection, GptNeox/LLaMA/Gemma MLPs, LLaMAMoE (gate n_embd x n_expert without bias, or the
    grouped router's weight; n_expert SwiGLU experts of moe_intermediate_size; shared experts;
    first_k_dense_replace dense layers). ``tie_embeddings`` (a train option) removes the LM head weight.
    """
    c = model.n_embd
    v = model.resolved_padded_vocab_size
    hs = model.resolved_head_size
    nh, ng = model.n_head, model.resolved_n_query_groups
    norms = _norm_params(model, c)  # ln_f
    attention = 0
    router = experts = dense = 0
    active_matmul = 0
    expert_size = 0
    moe_layers = 0
    for layer in range(model.n_layer):
        # norms of the block
        if model.norm_1:
            norms += _norm_params(model, c)
        if model.post_attention_norm:
            norms += _norm_params(model, c)
        if model.norm_2 and not model.shared_attention_norm:
            norms += _norm_params(model, c)
        if model.post_mlp_norm:
            norms += _norm_params(model, c)
        # attention
        if model.latent_attention is None:
            w1, b1 = _linear(c, (nh + 2 * ng) * hs, model.bias or model.attn_bias)
            w2, b2 = _linear(hs * nh, c, model.bias)
            attn_w, attn_b = w1 + w2, b1 + b2
            if model.norm_qk:
                q = nh * hs if model.norm_qk_type == "olmo2" else hs
                k = ng * hs if model.norm_qk_type == "olmo2" else hs
                norms += _norm_params(model, q) + _norm_params(model, k)
        else:
            la = model.latent_attention
            q_lora, kv_lora = la["q_lora_rank"], la["kv_lora_rank"]
            rope, nope, vdim = la["qk_rope_head_dim"], la["qk_nope_head_dim"], la["v_head_dim"]
            parts = [
                _linear(c, q_lora, model.attn_bias),
                _linear(q_lora, nh * (rope + nope), model.bias),
                _linear(c, kv_lora + rope, model.attn_bias),
                _linear(kv_lora, ng * (nope + vdim), model.bias),
                _linear(nh * vdim, c, model.bias),
            ]
            attn_w, attn_b = sum(w for w, _ in parts), sum(x for _, x in parts)
            norms += q_lora + kv_lora  # q_a_norm, kv_a_norm are always RMSNorm
        attention += attn_w + attn_b
        active_matmul += attn_w
        # MLP
        dense_layer = (
            model.first_k_dense_replace is not None and layer < model.first_k_dense_replace
        )
        if model.is_moe and not dense_layer:
            moe_layers += 1
            router += c * model.n_expert  # nn.Linear(bias=False) or GroupedTopkRouter.weight
            ew, eb = _mlp(model, "LLaMAMLP", model.moe_intermediate_size or 0)
            expert_size = ew + eb
            experts += model.n_expert * expert_size
            active_matmul += c * model.n_expert + model.n_expert_per_token * ew
            if model.n_shared_expert:
                sw, sb = _mlp(
                    model, "LLaMAMLP", (model.moe_intermediate_size or 0) * model.n_shared_expert
                )
                dense += sw + sb
                active_matmul += sw
        else:
            kind = "LLaMAMLP" if dense_layer else model.mlp_class_name
            mw, mb = _mlp(model, kind, model.resolved_intermediate_size)
            dense += mw + mb
            active_matmul += mw
    embedding = v * c
    lm_head = 0 if tie_embeddings else v * c
    lm_head += v if model.lm_head_bias else 0
    active_matmul += v * c
    total = embedding + lm_head + norms + attention + router + experts + dense
    inactive = moe_layers * (model.n_expert - model.n_expert_per_token) * expert_size
    return ParamCounts(
        total=total,
        embedding=embedding,
        lm_head=lm_head,
        norms=norms,
        attention=attention,
        router=router,
        experts=experts,
        dense_mlp=dense,
        active=total - inactive,
        active_matmul=active_matmul,
        expert_size=expert_size,
        moe_layers=moe_layers,
    )


# --------------------------------------------------------------------------------------------------
# FLOPs, memory, checkpoints, time
# --------------------------------------------------------------------------------------------------

#: GPUs the time estimates are given for.
ESTIMATE_GPUS = ("H100", "H200", "A100")

#: Dense peak FLOP/s per GPU by precision family (bf16/fp16 tensor cores for the 16-bit
#: precisions, TF32 for 32-true) of :data:`ESTIMATE_GPUS`, from ``service.contract.PEAK_FLOPS``
#: (the table the measured MFU uses too).
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    gpu: contract.PEAK_FLOPS[gpu] for gpu in ESTIMATE_GPUS
}

#: Model FLOPs utilisation assumed for the time estimates.
DEFAULT_MFU = 0.4


def _param_bytes(precision: str) -> int:
    """Bytes per parameter (and gradient): *-true keeps 16-bit weights; mixed and 32-true keep fp32."""
    return 2 if precision in ("bf16-true", "16-true") else 4


def _activation_bytes(precision: str) -> int:
    """Bytes per saved activation element: 4 for 32-true, else 2 (bf16/fp16 autocast or 16-bit weights)."""
    return 4 if precision == "32-true" else 2


def _optimizer_states(train: TrainConfig) -> int:
    """Optimizer state tensors per parameter (AdamW/Adam: exp_avg, exp_avg_sq [+ max for amsgrad];
    SGD: a momentum buffer when momentum > 0)."""
    opt = train.optimizer
    args = opt.init_args
    if opt.name in ("AdamW", "Adam"):
        return 3 if args.amsgrad else 2
    return 1 if args.momentum else 0


def attention_flops_per_token(model: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token of the attention score and value products (forward + backward).

    PaLM (Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with Pathways", appendix B):
    ``12 * n_layer * n_head * head_size * seq_len``, i.e. per layer 2*T*n_head*d_qk (QK^T) +
    2*T*n_head*d_v (AV) forward, x3 for forward + backward. The causal mask is not discounted (as in PaLM).
    Layers with sliding-window attention use min(seq_len, sliding_window_size); latent attention uses
    d_qk = qk_rope_head_dim + qk_nope_head_dim and d_v = v_head_dim.
    """
    if model.latent_attention is not None:
        la = model.latent_attention
        d_qk = la["qk_rope_head_dim"] + la["qk_nope_head_dim"]
        d_v = la["v_head_dim"]
    else:
        d_qk = d_v = model.resolved_head_size
    total = 0
    for layer in range(model.n_layer):
        t = seq_len
        if model.sliding_window_size is not None:
            indices = model.sliding_window_indices or [1] * model.n_layer
            if indices[layer]:
                t = min(seq_len, model.sliding_window_size)
        total += 6 * t * model.n_head * (d_qk + d_v)
    return total


#: Where a rank's training memory lives: "cpu" (host memory, the process's resident set size, what
#: the kernel's OOM killer and a cgroup limit see) or "cuda" (the GPU's device memory).
DEVICE_KINDS = ("cpu", "cuda")

#: Resident memory of a training process before its first tensor, on a CPU: the Python interpreter,
#: PyTorch (the CUDA build's libraries are mapped even on a CPU), Lightning, LitGPT, tokenizers, the
#: token cache and the intra-op threads' stacks. Measured: 0.72 GiB after the imports (torch 2.14,
#: Python 3.11, x86-64) and 0.81-0.84 GiB for `cpu-tiny` besides its 0.14 GiB of tensors
#: (bench/memory_check.py, bench/RESULTS.md).
CPU_RUNTIME_BYTES = int(0.8 * 2**30)

#: Device memory a process holds outside PyTorch's caching allocator on a CUDA GPU: the CUDA context
#: with lazily loaded kernels (CUDA_MODULE_LOADING=LAZY, the default since CUDA 11.7), cuBLAS/cuDNN
#: handles and the NCCL buffers of one rank. PyTorch's CUDA notes ("Memory management") leave the
#: context out of ``memory_allocated``; 0.5-1 GiB is what ``nvidia-smi`` shows for an idle PyTorch
#: process on an H100. Not yet measured by this project: bench/gpu_check.sh does on a lent GPU.
CUDA_RUNTIME_BYTES = int(0.75 * 2**30)

#: Resident memory of TorchInductor compiling in the training process on a CPU (``compile_threads=1``):
#: Dynamo/AOTAutograd/Inductor's modules, the FX graphs of one transformer block's forward and
#: backward, the generated C++ and the loaded kernels (regional compilation: one block's graphs,
#: reused by every layer). Fitted to the smoke test's peak (compiled, 32-true, its activations
#: negligible): 9.14 and 9.22 GiB measured in two runs = 8.18 GiB of weights, gradients and AdamW
#: state + the 0.8 GiB runtime + 0.16-0.24 GiB (bench/RESULTS.md).
CPU_COMPILE_BYTES = int(0.25 * 2**30)

#: The same on a CUDA GPU: Inductor compiles on the host, but CUDA graphs (``reduce-overhead``,
#: ``max-autotune``) keep a private memory pool for the recorded graphs' inputs and outputs
#: (PyTorch's "CUDA Graph Trees" notes) and Triton's autotuning allocates scratch buffers. Counted as
#: this fraction of the activations of one micro-batch; to be checked on a GPU (bench/gpu_check.sh).
CUDA_COMPILE_FRACTION = 0.1

#: Memory the allocator holds beyond the live tensors, as a fraction of the *transient* tensors (the
#: activations, autocast copies, logits gradient and backward temporaries that every micro-batch
#: allocates and frees; the weights, gradients and optimizer state are allocated once and cost
#: nothing extra: the smoke test's peak shows none).
#:
#: CPU: glibc malloc keeps freed blocks under its mmap threshold (dynamic, up to 32 MiB: most
#: activations and the experts' 6 MiB weight gradients) in per-thread arenas, where the next
#: micro-batch's differently sized blocks do not always fit (mallopt(3), "M_MMAP_THRESHOLD"), so
#: the resident set creeps up as a run goes on. Measured on the shipped config (transient tensors
#: 3.1 GiB; bench/RESULTS.md): 0.50x after 3 steps of 2 micro-batches, 0.84x after 2 steps of 8,
#: 1.22x for the whole run (4 steps of 32). 0.85 keeps the estimate within 15% of all three.
#:
#: CUDA: PyTorch's caching allocator rounds and splits blocks (``memory_reserved`` over
#: ``memory_allocated``; PyTorch's CUDA notes, "Memory management"); a usual figure, to be checked on
#: a GPU (bench/gpu_check.sh).
ALLOCATOR_SLACK = {"cpu": 0.85, "cuda": 0.2}


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak training memory of one data-parallel rank, in bytes (no sharding: every rank holds everything).

    Tensors (the same on a CPU and a GPU):

    Attributes:
        weights: parameters x (4 bytes for 32-true and *-mixed, 2 for *-true).
        gradients: same size as the weights (fp32 ``.grad`` under *-mixed, accumulated in place).
        optimizer_states: AdamW/Adam: 2 (3 with amsgrad) states per parameter in the parameters' dtype
            (fp32 except *-true); SGD: 1 with momentum, else 0. The engine uses the fused AdamW kernel,
            which allocates no full-size temporaries (the foreach default would add several GB).
        autocast_weight_copies: *-mixed only: autocast keeps a 16-bit copy of every matmul weight
            (2 bytes each) for the step (saved for the backward pass; the grouped MoE stacks the
            experts' weights in the autocast dtype, the same bytes).
        activations_no_checkpointing: activations saved for backward for one micro-batch.
        activations_checkpointing: the same with activation checkpointing of every block.
        activations: the one of the two that train.gradient_checkpointing selects.
        logits_gradient: the gradient of the LM head's logits (tokens x padded_vocab_size x activation
            bytes), allocated when the backward pass starts while every saved activation is still alive
            (the logits and the fp32 log-softmax of ``litgpt.utils.chunked_cross_entropy`` are in
            ``activations``).
        backward_temporaries: the largest gradient that exists twice while it is accumulated into
            ``.grad`` (fp32 size of the largest of embedding, LM head, or one MoE layer's stacked
            expert weights, whose gradient the grouped GEMM produces in one piece).
        tensors: the live tensors at the peak. With gradient accumulation (2 or more micro-batches per
            optimizer step) the peak is the start of a later micro-batch's backward pass, where the
            gradients of the earlier ones, the optimizer state and every saved activation coexist:
            weights + gradients + optimizer_states + autocast_weight_copies + activations +
            logits_gradient + backward_temporaries. With one micro-batch per step the gradients are
            freed after each step (``zero_grad(set_to_none=True)``) and grow while the activations are
            freed: weights + optimizer_states + backward_temporaries + the larger of gradients and
            (activations + autocast_weight_copies + logits_gradient).

    The process around the tensors, for ``device_kind``:

    Attributes:
        device_kind: "cpu" or "cuda": what ``runtime``, ``compile_workspace``, ``allocator_slack`` and
            ``total`` are for (``estimate(..., device_kind=...)``).
        runtime: the process's memory before its first tensor: `CPU_RUNTIME_BYTES` (resident set) or
            `CUDA_RUNTIME_BYTES` (the CUDA context outside the caching allocator).
        compile_workspace: 0 without ``optimization.compile``; else `CPU_COMPILE_BYTES` on a CPU, or
            `CUDA_COMPILE_FRACTION` x activations on a GPU.
        allocator_slack: `ALLOCATOR_SLACK` [device_kind] x the transient tensors (activations,
            autocast_weight_copies, logits_gradient, backward_temporaries).
        total: the per-rank peak on ``device_kind``: tensors + runtime + compile_workspace +
            allocator_slack. What admission compares with a worker's memory per device.
        total_cpu: ``total`` for a CPU rank (peak resident set size, host memory).
        total_cuda: ``total`` for a CUDA rank (peak device memory: ``max_memory_reserved`` + the context).

    Measured against real runs by bench/memory_check.py (bench/RESULTS.md): within 15% of the peak
    resident set size of the shipped config, the smoke test, ``cpu-tiny`` and a production-like config
    on a CPU. The CUDA terms are not yet checked on a GPU (bench/gpu_check.sh compares them).
    """

    weights: int
    gradients: int
    optimizer_states: int
    autocast_weight_copies: int
    activations_no_checkpointing: int
    activations_checkpointing: int
    activations: int
    logits_gradient: int
    backward_temporaries: int
    tensors: int
    device_kind: str
    runtime: int
    compile_workspace: int
    allocator_slack: int
    total: int
    total_cpu: int
    total_cuda: int

    def for_device(self, kind: str) -> int:
        """The per-rank peak on a ``kind`` ("cpu" or "cuda") worker: ``total_cpu`` or ``total_cuda``.
        Raises ValueError for another kind."""
        if kind not in DEVICE_KINDS:
            raise ValueError(f"device kind must be one of {', '.join(DEVICE_KINDS)}, got {kind!r}")
        return self.total_cpu if kind == "cpu" else self.total_cuda

    def to_dict(self) -> dict:
        return asdict(self)


def _process_memory(
    kind: str, transient: int, activations: int, compiled: bool
) -> tuple[int, int, int]:
    """(runtime, compile_workspace, allocator_slack) of a rank on a ``kind`` device (see `MemoryEstimate`)."""
    if kind == "cpu":
        runtime, workspace = CPU_RUNTIME_BYTES, (CPU_COMPILE_BYTES if compiled else 0)
    else:
        runtime, workspace = (
            CUDA_RUNTIME_BYTES,
            (int(CUDA_COMPILE_FRACTION * activations) if compiled else 0),
        )
    return runtime, workspace, int(ALLOCATOR_SLACK[kind] * transient)


def activation_bytes(
    model: ModelConfig, micro_batch_size: int, seq_len: int, precision: str, checkpointing: bool
) -> int:
    """Activation memory saved for backward for one micro-batch, in bytes.

    Method of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
    (arXiv:2205.05198, section 4.1: count every tensor a layer saves for its backward pass; their GPT
    formula is ``s*b*h*(34 + 5*a*s/h)`` bytes per layer), re-derived for LitGPT's blocks, which have no
    dropout and use a fused SDPA kernel (flash / memory-efficient attention stores no T x T matrix).
    Per token and layer, in elements of ``a`` bytes (a = 4 for 32-true, else 2):

    * norms and residuals: 2 x n_embd (norm_1 and norm_2 inputs) + 2 x n_embd (their outputs, the inputs of
      the qkv projection and of the MLP);
    * attention: q and the GQA-expanded k, v (3 x n_head x head_size, LitGPT repeats k/v to n_head heads
      before SDPA), the SDPA output and its transposed copy for the projection (2 x n_head x head_size);
      with attention_logit_softcapping (LitGPT's manual path) the scores and probabilities add
      n_head x T x (2a + 4) bytes;
    * MLP: SwiGLU (LLaMAMLP/GemmaMLP) 4 x intermediate (fc_1, fc_2, activation, product); GptNeoxMLP
      2 x intermediate; LLaMAMoE: n_expert router logits + for each of the n_expert_per_token experts
      the gathered input and weighted output (2 x n_embd) and 4 x moe_intermediate_size (+ shared experts).

    Outside the blocks, per token: embedding output and final norm (2 x n_embd x a) and the logits
    (padded_vocab_size x (a + 4): the logits plus the fp32 log-softmax of the cross-entropy).

    With checkpointing (activation checkpointing of every block) only each block's input (n_embd x a) is
    kept, plus one block's full activations while it is recomputed in the backward pass.
    """
    a = _activation_bytes(precision)
    c = model.n_embd
    hs = model.resolved_head_size
    nh = model.n_head
    tokens = micro_batch_size * seq_len
    attn = 4 * c + 5 * nh * hs
    attn_bytes_extra = (
        nh * seq_len * (2 * a + 4) if model.attention_logit_softcapping is not None else 0
    )
    per_layer: list[int] = []
    for layer in range(model.n_layer):
        dense_layer = (
            model.first_k_dense_replace is not None and layer < model.first_k_dense_replace
        )
        if model.is_moe and not dense_layer:
            i = model.moe_intermediate_size or 0
            mlp = model.n_expert + model.n_expert_per_token * (2 * c + 4 * i)
            if model.n_shared_expert:
                mlp += 4 * i * model.n_shared_expert
        elif dense_layer or model.mlp_class_name in ("LLaMAMLP", "GemmaMLP"):
            mlp = 4 * model.resolved_intermediate_size
        else:
            mlp = 2 * model.resolved_intermediate_size
        per_layer.append(tokens * ((attn + mlp) * a + attn_bytes_extra))
    outside = tokens * (2 * c * a + model.resolved_padded_vocab_size * (a + 4))
    if checkpointing:
        return model.n_layer * tokens * c * a + max(per_layer) + outside
    return sum(per_layer) + outside


@dataclass(frozen=True)
class Estimate:
    """Resources of one training run (see `estimate`). All sizes in bytes, times in seconds.

    Attributes:
        plan: the `TrainingPlan` (optimizer steps, tokens actually trained, ...).
        params: `ParamCounts` (total as LitGPT counts it, active, active matmul).
        flops_per_token: training FLOPs per token = 6 x params.active_matmul + attention_flops_per_token
            (model FLOPs as in MFU; excludes recomputation).
        attention_flops_per_token: the attention term (PaLM appendix B).
        recompute_flops_per_token: extra forward FLOPs spent by activation checkpointing (0 when off);
            hardware FLOPs = flops_per_token + this.
        flops_per_step: flops_per_token x tokens per optimizer step (all ranks).
        total_flops: flops_per_token x plan.tokens_trained.
        memory: `MemoryEstimate` of one rank.
        checkpoint_bytes: one checkpoint's model weights (parameters in the training dtype + persistent buffers).
        checkpoint_with_optimizer_bytes: the same plus the optimizer state (what a resumable checkpoint holds).
        checkpoints_written: intermediate checkpoints (every save_interval steps before the last) + final/.
        storage_bytes: checkpoints_written x checkpoint_with_optimizer_bytes (all kept).
        mfu: the model FLOPs utilisation assumed for ``time_s``.
        peak_flops: peak FLOP/s of one GPU used for ``time_s`` (bf16 peaks; TF32 for 32-true).
        time_s: GPU name -> seconds for plan.tokens_trained on world_size such GPUs at ``mfu``:
            total_flops / (world_size x peak x mfu).
    """

    plan: TrainingPlan
    params: ParamCounts
    flops_per_token: int
    attention_flops_per_token: int
    recompute_flops_per_token: int
    flops_per_step: int
    total_flops: int
    memory: MemoryEstimate
    checkpoint_bytes: int
    checkpoint_with_optimizer_bytes: int
    checkpoints_written: int
    storage_bytes: int
    mfu: float
    peak_flops: dict[str, float]
    time_s: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-friendly nested dict of every field."""
        return asdict(self)


def estimate(
    train: TrainConfig,
    model: ModelConfig,
    mfu: float = DEFAULT_MFU,
    device_kind: str = "cuda",
    *,
    plan: TrainingPlan | None = None,
) -> Estimate:
    """Parameters, FLOPs, memory, checkpoint size and time of a run, from validated configs (no torch).

    Args:
        train: validated `TrainConfig`.
        model: validated `ModelConfig`.
        mfu: assumed model FLOPs utilisation for the time estimates (0 < mfu <= 1).
        device_kind: "cuda" (GPU device memory) or "cpu" (host memory, resident set size): what
            ``memory.total`` is for. ``memory.total_cpu`` and ``memory.total_cuda`` hold both.
        plan: the pair's `TrainingPlan` when already computed (``Validated.plan``); None
            computes it.

    Sources: parameter count from LitGPT 0.5.13's module structure (equals
    ``litgpt.utils.num_parameters(GPT(config))``); FLOPs per token ``6N + 12 * n_layer * n_head *
    head_size * T`` with N the active matmul parameters (Kaplan et al. 2020 "Scaling Laws for Neural
    Language Models" section 2.1 for 6N; PaLM, Chowdhery et al. 2022, appendix B for the attention term);
    activations after Korthikanti et al. 2022 (see `activation_bytes`).

    Raises ValueError for mfu outside (0, 1] or an unknown device_kind.
    """
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    if device_kind not in DEVICE_KINDS:
        raise ValueError(
            f"device_kind must be one of {', '.join(DEVICE_KINDS)}, got {device_kind!r}"
        )
    if plan is None:
        plan = training_plan(train, model)
    t = train.train
    params = count_parameters(model, tie_embeddings=bool(t.tie_embeddings))
    attn = attention_flops_per_token(model, plan.seq_len)
    flops_per_token = 6 * params.active_matmul + attn
    lm_head_matmul = model.resolved_padded_vocab_size * model.n_embd
    recompute = (
        (2 * (params.active_matmul - lm_head_matmul) + attn // 3) if t.gradient_checkpointing else 0
    )

    precision = train.precision
    pb = _param_bytes(precision)
    weights = params.total * pb
    gradients = params.total * pb
    optimizer_states = _optimizer_states(train) * params.total * pb
    matmul_weights = params.total - params.embedding - params.norms - _bias_params(model)
    if t.tie_embeddings:
        matmul_weights += params.embedding  # the tied matrix is the LM head's weight
    autocast = 2 * matmul_weights if precision.endswith("-mixed") else 0
    act_plain = activation_bytes(
        model, t.micro_batch_size, plan.seq_len, precision, checkpointing=False
    )
    act_ckpt = activation_bytes(
        model, t.micro_batch_size, plan.seq_len, precision, checkpointing=True
    )
    act = act_ckpt if t.gradient_checkpointing else act_plain
    logits_grad = (
        t.micro_batch_size
        * plan.seq_len
        * model.resolved_padded_vocab_size
        * _activation_bytes(precision)
    )
    stacked_experts = (
        3 * model.n_expert * model.n_embd * (model.moe_intermediate_size or 0)
        if params.moe_layers
        else 0
    )
    temporaries = 4 * max(params.embedding, params.lm_head, stacked_experts)
    transient = act + autocast + logits_grad + temporaries
    if plan.grad_accum_iters > 1:
        tensors = weights + gradients + optimizer_states + transient
    else:
        tensors = (
            weights + optimizer_states + temporaries + max(gradients, act + autocast + logits_grad)
        )
    compiled = bool(train.optimization.compile)
    per_kind = {}
    for kind in DEVICE_KINDS:
        runtime, workspace, slack = _process_memory(kind, transient, act, compiled)
        per_kind[kind] = (runtime, workspace, slack, tensors + runtime + workspace + slack)
    runtime, workspace, slack, total = per_kind[device_kind]
    memory = MemoryEstimate(
        weights=weights,
        gradients=gradients,
        optimizer_states=optimizer_states,
        autocast_weight_copies=autocast,
        activations_no_checkpointing=act_plain,
        activations_checkpointing=act_ckpt,
        activations=act,
        logits_gradient=logits_grad,
        backward_temporaries=temporaries,
        tensors=tensors,
        device_kind=device_kind,
        runtime=runtime,
        compile_workspace=workspace,
        allocator_slack=slack,
        total=total,
        total_cpu=per_kind["cpu"][3],
        total_cuda=per_kind["cuda"][3],
    )

    buffers = 4 * model.n_expert * params.moe_layers if model.n_expert_groups else 0
    ckpt = weights + buffers
    ckpt_opt = ckpt + optimizer_states
    # step-N folders at N = save_interval, 2 x save_interval, ... below the last step
    # (the last step writes final/ instead)
    intermediate = (
        (plan.optimizer_steps - 1) // t.save_interval
        if t.save_interval and plan.optimizer_steps > 0
        else 0
    )
    written = intermediate + (1 if plan.optimizer_steps > 0 else 0)

    family = contract.precision_family(precision)
    peaks = {gpu: p[family] for gpu, p in GPU_PEAK_FLOPS.items()}
    total_flops = flops_per_token * plan.tokens_trained
    times = {gpu: total_flops / (plan.world_size * peak * mfu) for gpu, peak in peaks.items()}
    return Estimate(
        plan=plan,
        params=params,
        flops_per_token=flops_per_token,
        attention_flops_per_token=attn,
        recompute_flops_per_token=recompute,
        flops_per_step=flops_per_token * plan.tokens_per_step,
        total_flops=total_flops,
        memory=memory,
        checkpoint_bytes=ckpt,
        checkpoint_with_optimizer_bytes=ckpt_opt,
        checkpoints_written=written,
        storage_bytes=written * ckpt_opt,
        mfu=mfu,
        peak_flops=peaks,
        time_s=times,
    )


def _bias_params(model: ModelConfig) -> int:
    """Bias parameters of all linear layers (not norms)."""
    full = count_parameters(model)
    no_bias = count_parameters(
        model.model_copy(update={"bias": False, "attn_bias": False, "lm_head_bias": False})
    )
    return full.total - no_bias.total
