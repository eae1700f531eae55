"""The model config document (:class:`ModelConfig`): every field of ``litgpt.Config`` (LitGPT
0.5.13) with its name, type and default, and the rules inside it (divisibility, MoE fields,
RoPE dimensions).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from service.config.fields import MAX_LAYERS, NameText, Section
from service.config.issues import RuleErrors

__all__ = ["ModelConfig", "model_config_json_schema"]


class ModelConfig(Section):
    """Every field of ``litgpt.Config`` (LitGPT 0.5.13) with its name, type and default.

    Derived values (``head_size``, ``padded_vocab_size``, ``n_query_groups``, ``intermediate_size``)
    stay null here when not given, exactly as LitGPT receives them; the ``resolved_*`` properties give
    the values LitGPT computes in ``Config.__post_init__``.
    """

    name: NameText = Field(
        default="",
        description="Model name (free text, at most 200 characters, no "
        "control characters; LitGPT uses it for a few quirks, e.g. 'Gemma' in "
        "the name offsets RMSNorm).",
    )
    hf_config: dict = Field(
        default_factory=dict, description="Hugging Face origin {org, name}; informational."
    )
    block_size: int = Field(
        default=4096, ge=1, description="Maximum context length (RoPE cache size)."
    )
    n_layer: int = Field(
        default=16,
        ge=1,
        le=MAX_LAYERS,
        description=f"Number of transformer blocks (at most {MAX_LAYERS}: the deepest "
        "published LLMs have ~130; the bound keeps validation and estimates cheap).",
    )
    n_embd: int = Field(default=4096, ge=1, description="Hidden size (embedding width).")
    vocab_size: int = Field(
        default=50254, ge=1, description="Number of tokenizer tokens. Must be <= padded_vocab_size."
    )
    padding_multiple: int = Field(
        default=512,
        ge=1,
        description="padded_vocab_size is rounded up to a multiple of this when not set.",
    )
    padded_vocab_size: int | None = Field(
        default=None,
        ge=1,
        description="Rows of the embedding and LM head. Null: vocab_size rounded up to padding_multiple.",
    )
    norm_class_name: Literal["LayerNorm", "RMSNorm"] = Field(
        default="LayerNorm",
        description="Normalisation layer: LayerNorm (weight+bias) or RMSNorm (weight).",
    )
    norm_eps: float = Field(default=1e-5, gt=0, description="Epsilon of the normalisation layers.")
    norm_qk: bool = Field(default=False, description="Normalise queries and keys (QK-norm).")
    norm_qk_type: Literal["default", "olmo2"] = Field(
        default="default",
        description="QK-norm shape: per head (default) or over all heads (olmo2).",
    )
    post_attention_norm: bool = Field(
        default=False, description="Extra norm after attention (Gemma-2 style)."
    )
    post_mlp_norm: bool = Field(
        default=False, description="Extra norm after the MLP (Gemma-2 style)."
    )
    parallel_residual: bool = Field(
        default=True,
        description="GPT-NeoX parallel attention+MLP residual (false: sequential, LLaMA style).",
    )
    shared_attention_norm: bool = Field(
        default=False,
        description="Reuse norm_1's output for the MLP (only with parallel_residual).",
    )
    n_head: int = Field(default=32, ge=1, description="Number of query heads.")
    head_size: int | None = Field(
        default=None,
        ge=1,
        description="Width of one attention head. Null: n_embd // n_head (n_embd must divide).",
    )
    n_query_groups: int | None = Field(
        default=None,
        ge=1,
        description="Key/value heads (GQA): n_head = MHA, 1 = MQA. n_head must be divisible by it. Null: n_head.",
    )
    attn_bias: bool = Field(
        default=False, description="Bias in the qkv projection (also on when bias is true)."
    )
    attention_scores_scalar: int | None = Field(
        default=None,
        ge=1,
        description="Scale attention scores by 1/sqrt(this) instead of 1/sqrt(head_size).",
    )
    sliding_window_size: int | None = Field(
        default=None,
        ge=1,
        description="Sliding-window attention width (null: full causal attention).",
    )
    sliding_window_indices: list[int] | None = Field(
        default=None,
        description="Per layer 0/1: which layers use the sliding window (default all).",
    )
    attention_logit_softcapping: float | None = Field(
        default=None,
        gt=0,
        description="Soft-cap attention logits (disables fused SDPA/flash attention).",
    )
    rope_base: int = Field(default=10000, ge=1, description="RoPE base period (theta).")
    rotary_percentage: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Fraction of each head's dimensions that get rotary embeddings. LitGPT's default 0.25 is "
        "GPT-NeoX's; LLaMA/Mixtral use 1.0.",
    )
    rope_condense_ratio: int = Field(
        default=1, ge=1, description="Position interpolation factor for RoPE."
    )
    rope_adjustments: dict | None = Field(
        default=None, description="RoPE scaling (Llama-3.1 / YaRN style) parameters."
    )
    rope_interleave: bool = Field(default=False, description="Interleaved (GPT-J) RoPE layout.")
    intermediate_size: int | None = Field(
        default=None,
        ge=1,
        description="Dense MLP width. Null: 4 x n_embd (not allowed for LLaMAMLP).",
    )
    moe_intermediate_size: int | None = Field(
        default=None, ge=1, description="Width of each expert's MLP (required for LLaMAMoE)."
    )
    bias: bool = Field(default=True, description="Bias in the attention and MLP linear layers.")
    mlp_class_name: Literal["GptNeoxMLP", "LLaMAMLP", "GemmaMLP", "LLaMAMoE"] = Field(
        default="GptNeoxMLP",
        description="MLP block: GptNeoxMLP (GELU), LLaMAMLP (SwiGLU), GemmaMLP (GeGLU) or LLaMAMoE "
        "(mixture of SwiGLU experts).",
    )
    gelu_approximate: Literal["none", "tanh"] = Field(
        default="none", description="GELU approximation."
    )
    n_expert: int = Field(
        default=0, ge=0, description="Number of experts per MoE layer (LLaMAMoE)."
    )
    n_shared_expert: int | None = Field(
        default=None,
        ge=0,
        description="Always-active shared experts (DeepSeek style), width moe_intermediate_size each.",
    )
    n_expert_groups: int | None = Field(
        default=None, ge=1, description="Expert groups for group-limited routing (DeepSeek-V3)."
    )
    n_topk_groups: int | None = Field(
        default=None, ge=1, description="Groups kept per token in group-limited routing."
    )
    n_topk_scores_per_group: int | None = Field(
        default=None,
        ge=1,
        description="Scores per group used to rank groups in group-limited routing.",
    )
    n_expert_per_token: int = Field(
        default=0,
        ge=0,
        description="Experts each token is routed to (top-k); 1 <= k <= n_expert for LLaMAMoE.",
    )
    first_k_dense_replace: int | None = Field(
        default=None, ge=0, description="The first k layers use a dense LLaMAMLP instead of MoE."
    )
    routed_scaling_factor: float = Field(
        default=1.0, gt=0, description="Multiplier on the routing weights."
    )
    norm_topk_prob: bool = Field(
        default=False, description="Renormalise top-k routing probabilities (grouped router)."
    )
    scale_embeddings: bool = Field(
        default=False, description="Multiply embeddings by sqrt(n_embd) (Gemma)."
    )
    lm_head_bias: bool = Field(default=False, description="Bias in the LM head.")
    final_logit_softcapping: float | None = Field(
        default=None, gt=0, description="Soft-cap the output logits."
    )
    norm_1: bool = Field(default=True, description="Norm before attention (false: identity).")
    norm_2: bool = Field(default=True, description="Norm before the MLP (false: identity).")
    latent_attention: dict | None = Field(
        default=None,
        description="Multi-head latent attention (DeepSeek) ranks: q_lora_rank, kv_lora_rank, qk_rope_head_dim, "
        "qk_nope_head_dim, v_head_dim.",
    )
    rope_local_base_freq: float | None = Field(
        default=None, gt=0, description="RoPE base for local-attention layers (Gemma-3)."
    )
    rope_indices: list[int] | None = Field(
        default=None, description="Per layer 0/1: 1 = use rope_local_base_freq."
    )

    # ---- derived values (what litgpt.Config.__post_init__ computes)
    @property
    def resolved_head_size(self) -> int:
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def resolved_padded_vocab_size(self) -> int:
        if self.padded_vocab_size is not None:
            return self.padded_vocab_size
        n, k = self.vocab_size, self.padding_multiple
        return n if n % k == 0 else n + k - n % k

    @property
    def resolved_n_query_groups(self) -> int:
        return self.n_query_groups if self.n_query_groups is not None else self.n_head

    @property
    def resolved_intermediate_size(self) -> int:
        return self.intermediate_size if self.intermediate_size is not None else 4 * self.n_embd

    @property
    def rope_n_elem(self) -> int:
        if self.latent_attention is not None:
            return int(self.latent_attention["qk_rope_head_dim"])
        return int(self.rotary_percentage * self.resolved_head_size)

    @property
    def is_moe(self) -> bool:
        return self.mlp_class_name == "LLaMAMoE"

    def litgpt_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``litgpt.Config(**kwargs)``: every field, as given (LitGPT derives the rest)."""
        return self.model_dump()

    @model_validator(mode="after")
    def _rules(self) -> ModelConfig:
        errors: list[tuple[str, str]] = []
        if self.head_size is None and self.n_embd % self.n_head != 0:
            errors.append(
                (
                    "n_embd",
                    f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) when head_size is "
                    f"not set (head_size = n_embd / n_head = {self.n_embd / self.n_head:g})",
                )
            )
        if self.n_query_groups is not None:
            if self.n_query_groups > self.n_head or self.n_head % self.n_query_groups != 0:
                errors.append(
                    (
                        "n_query_groups",
                        f"n_head ({self.n_head}) must be divisible by n_query_groups "
                        f"({self.n_query_groups})",
                    )
                )
        if self.padded_vocab_size is not None and self.vocab_size > self.padded_vocab_size:
            errors.append(
                (
                    "vocab_size",
                    f"vocab_size ({self.vocab_size}) must be <= padded_vocab_size "
                    f"({self.padded_vocab_size}); LitGPT would silently cut vocab_size to {self.padded_vocab_size}",
                )
            )
        if self.mlp_class_name == "LLaMAMLP" and self.intermediate_size is None:
            errors.append(
                ("intermediate_size", "mlp_class_name LLaMAMLP requires intermediate_size")
            )
        if self.is_moe:
            if self.n_expert < 1:
                errors.append(
                    (
                        "n_expert",
                        f"mlp_class_name LLaMAMoE requires n_expert >= 1, got {self.n_expert}",
                    )
                )
            elif not 1 <= self.n_expert_per_token <= self.n_expert:
                errors.append(
                    (
                        "n_expert_per_token",
                        f"n_expert_per_token ({self.n_expert_per_token}) must be between 1 and "
                        f"n_expert ({self.n_expert}) for mlp_class_name LLaMAMoE",
                    )
                )
            if self.moe_intermediate_size is None:
                errors.append(
                    (
                        "moe_intermediate_size",
                        "mlp_class_name LLaMAMoE requires moe_intermediate_size "
                        "(the width of each expert)",
                    )
                )
        else:
            if self.first_k_dense_replace is not None:
                errors.append(
                    (
                        "first_k_dense_replace",
                        "first_k_dense_replace needs mlp_class_name LLaMAMoE, got "
                        f"{self.mlp_class_name}",
                    )
                )
        if self.n_expert_groups is not None:
            if self.n_expert_groups < 2 or self.n_expert % self.n_expert_groups != 0:
                errors.append(
                    (
                        "n_expert_groups",
                        f"n_expert_groups ({self.n_expert_groups}) must be > 1 and divide n_expert "
                        f"({self.n_expert})",
                    )
                )
            elif self.n_topk_groups is None:
                errors.append(("n_topk_groups", "n_expert_groups requires n_topk_groups"))
            elif (
                self.n_topk_scores_per_group is None
                or self.n_topk_scores_per_group > self.n_expert // self.n_expert_groups
            ):
                errors.append(
                    (
                        "n_topk_scores_per_group",
                        "n_expert_groups requires n_topk_scores_per_group <= experts per "
                        f"group ({self.n_expert // self.n_expert_groups})",
                    )
                )
        if not self.parallel_residual and self.shared_attention_norm:
            errors.append(
                (
                    "shared_attention_norm",
                    "shared_attention_norm needs parallel_residual true "
                    "(LitGPT has no non-parallel residual with a shared attention norm)",
                )
            )
        for name in ("sliding_window_indices", "rope_indices"):
            values = getattr(self, name)
            if values is not None:
                if len(values) < self.n_layer:
                    errors.append(
                        (
                            name,
                            f"{name} needs one 0/1 entry per layer (n_layer={self.n_layer}), got {len(values)}",
                        )
                    )
                elif not set(values) <= {0, 1}:
                    errors.append((name, f"{name} may only contain 0 and 1, got {values}"))
        if self.latent_attention is not None:
            keys = (
                "q_lora_rank",
                "kv_lora_rank",
                "qk_rope_head_dim",
                "qk_nope_head_dim",
                "v_head_dim",
            )
            missing = [
                k
                for k in keys
                if not isinstance(self.latent_attention.get(k), int) or self.latent_attention[k] < 1
            ]
            unknown = [k for k in self.latent_attention if k not in keys]
            if missing or unknown:
                errors.append(
                    (
                        "latent_attention",
                        "latent_attention needs positive integers "
                        + ", ".join(keys)
                        + (f"; missing/invalid: {', '.join(missing)}" if missing else "")
                        + (f"; unknown: {', '.join(unknown)}" if unknown else ""),
                    )
                )
            elif self.resolved_n_query_groups != self.n_head:
                errors.append(
                    (
                        "n_query_groups",
                        "latent_attention does not support GQA/MQA: n_query_groups must equal n_head",
                    )
                )
        if not errors and self.latent_attention is None:
            hs = self.resolved_head_size
            n_elem = self.rope_n_elem
            if n_elem % 2:
                errors.append(
                    (
                        "rotary_percentage",
                        f"rotary_percentage x head_size = {self.rotary_percentage} x {hs} gives "
                        f"{n_elem} rotary dimensions; RoPE needs an even number",
                    )
                )
        if errors:
            raise RuleErrors(errors)
        return self


def model_config_json_schema() -> dict:
    """JSON Schema (draft 2020-12) of the model config document, with a description on every field."""
    schema = ModelConfig.model_json_schema()
    schema.setdefault("title", "moejobs model config")
    return schema
