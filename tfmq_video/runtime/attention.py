"""Quantized attention for the STDiT3 port: replaces ``SelfAttention.attention`` and
``CrossAttention.attention`` on module instances.

Modes: ``int8`` (SageAttention-style INT8 Q/K, fp16 P.V; Triton kernel on GPU, its
PyTorch reference elsewhere) and ``fp`` (``scaled_dot_product_attention`` in the model's
dtype). ``auto`` chooses ``fp`` on every backend, because that is faster everywhere it was
measured: on CPU there is no fast INT8 attention kernel (the reference is slower than SDPA), and
on an H200 (session 20) the Triton INT8 kernel ran at 0.22x-0.83x of fp16 SDPA, so STDiT3-XL
layer sizes at 480p sampled at 1.05x of fp16 with W8A8 GEMMs and SDPA but 0.65x with INT8
attention (docs/benchmarks.md). ``int8`` stays available when asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tfmq_video.errors import ConfigError

ATTENTION_MODES = ("auto", "int8", "fp")


def key_mask_from_attn_mask(attn_mask: torch.Tensor | None) -> torch.Tensor | None:
    """STDiT3's (B, 1, 1, L) boolean attention mask -> a (B, L) key padding mask."""
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool or attn_mask.dim() != 4 or attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1:
        raise ConfigError(f"quantized attention supports (B, 1, 1, L) boolean key masks, got {tuple(attn_mask.shape)}")
    return attn_mask[:, 0, 0, :]


class QuantAttentionFn:
    """Callable ``(q, k, v, attn_mask=None) -> out`` installed as a module's ``attention`` method."""

    def __init__(self, mode: str, backend: str) -> None:
        if mode not in ("int8", "fp"):
            raise ConfigError(f"attention mode must be 'int8' or 'fp', got {mode!r}")
        self.mode = mode
        self.backend = backend

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.mode == "fp":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        from tfmq_video.kernels import int8_attention as int8_attn  # imports triton: only when used

        key_mask = key_mask_from_attn_mask(attn_mask)
        if self.backend == "triton":
            return int8_attn.int8_attention(q, k, v, key_mask)
        return int8_attn.int8_attention_ref(q, k, v, key_mask)

    def __repr__(self) -> str:
        return f"QuantAttentionFn(mode={self.mode}, backend={self.backend})"


def resolve_attention_mode(mode: str, backend: str) -> str:
    """``auto`` -> ``fp`` (SDPA: the faster one on every backend measured so far, see the module
    docstring; ``backend`` stays in the signature so that a faster kernel can change that per
    backend); other modes pass through."""
    if mode not in ATTENTION_MODES:
        raise ConfigError(f"unknown attention mode {mode!r}; choose one of {ATTENTION_MODES}")
    return "fp" if mode == "auto" else mode


def install_attention(model: nn.Module, mode: str, backend: str) -> int:
    """Install quantized attention on every module with an ``attention`` method; returns how many."""
    from dit_adapters.opensora.stdit3 import CrossAttention, SelfAttention

    resolved = resolve_attention_mode(mode, backend)
    count = 0
    for module in model.modules():
        if isinstance(module, (SelfAttention, CrossAttention)):
            object.__setattr__(module, "attention", QuantAttentionFn(resolved, backend))
            count += 1
    return count
