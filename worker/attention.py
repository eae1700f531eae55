"""``optimization.flash_attention*`` -> PyTorch's scaled-dot-product-attention backend selection.

LitGPT's attention calls ``torch.nn.functional.scaled_dot_product_attention`` (with
``is_causal=True`` and no mask during training), so the kernel is chosen by PyTorch from the
backends enabled with ``torch.nn.attention.sdpa_kernel``. The config maps onto ordered lists:

===========================================  ==============================================
config                                        CUDA backends, in priority order
===========================================  ==============================================
flash_attention_force                         FLASH only (fails loudly if it cannot run)
flash_attention                               FLASH, EFFICIENT, CUDNN, MATH
flash_attention false                         EFFICIENT, CUDNN, MATH
disable_math_fallback                         the same list without MATH
===========================================  ==============================================

A CPU has only the FLASH (PyTorch's own CPU flash kernel) and MATH implementations; the list is
restricted to those and the log says so. The separate ``flash-attn`` package is only reported
when importable on a CUDA machine; LitGPT's model does not call it, so PyTorch's FLASH backend
(the same FlashAttention-2 algorithm, built into PyTorch) is what runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass, field

from torch.nn.attention import SDPBackend, sdpa_kernel

#: the SDPA implementations PyTorch has for CPU tensors
CPU_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)


@dataclass
class AttentionChoice:
    """The SDPA backends to enable, in priority order, and notes for the log."""

    backends: list[SDPBackend]
    notes: list[str] = field(default_factory=list)
    flash_attn_package: bool = False

    def names(self) -> list[str]:
        """Backend names in priority order (``["FLASH_ATTENTION", "MATH"]``)."""
        return [b.name for b in self.backends]

    def context(self) -> contextlib.AbstractContextManager:
        """A context manager that enables exactly ``backends``, tried in this order."""
        return sdpa_kernel(self.backends, set_priority=True)


def choose_backends(
    *,
    flash_attention: bool,
    flash_attention_force: bool,
    disable_math_fallback: bool,
    device_type: str,
) -> AttentionChoice:
    """Map the three ``optimization`` flags onto SDPA backends for ``device_type`` ("cuda"/"cpu").

    Forcing flash on a CPU is refused earlier by the engine's pre-flight check; here it is only
    mapped (to FLASH, which PyTorch also has for CPU).
    """
    if flash_attention_force:
        wanted = [SDPBackend.FLASH_ATTENTION]
    else:
        wanted = [SDPBackend.FLASH_ATTENTION] if flash_attention else []
        wanted += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
        if not disable_math_fallback:
            wanted.append(SDPBackend.MATH)
    choice = AttentionChoice(backends=list(wanted))
    if device_type != "cuda":
        kept = [b for b in wanted if b in CPU_BACKENDS]
        dropped = [b.name for b in wanted if b not in CPU_BACKENDS]
        if dropped:
            choice.notes.append(
                f"on CPU only FLASH_ATTENTION and MATH exist: not using {', '.join(dropped)}"
            )
        if not kept:
            kept = [SDPBackend.MATH]
            choice.notes.append("no requested SDPA backend runs on CPU: using MATH")
        choice.backends = kept
    else:
        choice.flash_attn_package = importlib.util.find_spec("flash_attn") is not None
        if flash_attention or flash_attention_force:
            choice.notes.append(
                "flash-attn package "
                + (
                    "installed; LitGPT's attention runs through PyTorch SDPA's FLASH backend"
                    if choice.flash_attn_package
                    else "not installed; using PyTorch SDPA's built-in FLASH backend"
                )
            )
    return choice
