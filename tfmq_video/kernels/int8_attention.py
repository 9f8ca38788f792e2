"""INT8 fused attention in the SageAttention (v1) design.

Q and K are quantized to int8 with one scale per block of rows (BLOCK_M query rows, BLOCK_N
key rows) after K is smoothed by subtracting its mean over tokens (softmax is invariant to a
vector added to every key). ``sm_scale * log2(e)`` is folded into Q before quantization so the
online softmax uses ``exp2``. ``Q K^T`` is an int8 dot into int32; ``P V`` runs in fp16 with
fp32 accumulation. An optional key padding mask (B, N_k) (True = real token) serves
cross-attention to captions. Head dims are padded to a power of two inside the kernel (64,
72 -> 128, 128). Every query row needs at least one unmasked key.
"""

from __future__ import annotations

import math

import torch

from tfmq_video.errors import ConfigError
from tfmq_video.kernels._triton import HAS_TRITON, next_power_of_2, require_triton

LOG2E = 1.4426950408889634
BLOCK_M = 64
BLOCK_N = 64


def quantize_per_block(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, D) float -> int8 codes (B, H, N, D) and float32 scales (B, H, ceil(N / block))."""
    batch, heads, tokens, dim = x.shape
    blocks = math.ceil(tokens / block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, blocks * block - tokens))
    grouped = padded.reshape(batch, heads, blocks, block, dim)
    scale = (grouped.abs().amax(dim=(-1, -2)) / 127.0).clamp(min=1e-8)
    codes = torch.clamp(torch.round(grouped / scale[..., None, None]), -127, 127).to(torch.int8)
    return codes.reshape(batch, heads, blocks * block, dim)[:, :, :tokens].contiguous(), scale.contiguous()


def prepare_qk(
    q: torch.Tensor, k: torch.Tensor, sm_scale: float | None, block_m: int, block_n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth K, fold the softmax scale (base 2) into Q, quantize both per block."""
    scale = (1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale) * LOG2E
    k_smooth = k.float() - k.float().mean(dim=-2, keepdim=True)
    q_codes, q_scale = quantize_per_block(q.float() * scale, block_m)
    k_codes, k_scale = quantize_per_block(k_smooth, block_n)
    return q_codes, q_scale, k_codes, k_scale


def _dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    return codes.float() * scale.repeat_interleave(block, dim=-1)[..., : codes.shape[-2], None]


def int8_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    sm_scale: float | None = None, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
) -> torch.Tensor:
    """Reference of :func:`int8_attention` (same quantization, dense softmax, P in fp16)."""
    q_codes, q_scale, k_codes, k_scale = prepare_qk(q, k, sm_scale, block_m, block_n)
    logits = _dequantize_blocks(q_codes, q_scale, block_m) @ _dequantize_blocks(k_codes, k_scale, block_n).transpose(-1, -2)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits * math.log(2.0), dim=-1)
    return (probs.half().float() @ v.half().float()).to(q.dtype)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _int8_attention_kernel(
        q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, mask_ptr, out_ptr,
        heads, n_q, n_k, head_dim, q_blocks, k_blocks,
        HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (batch * head, query block): online softmax over key blocks."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        batch = bh // heads
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        rn0 = tl.arange(0, BLOCK_N)
        d_ok = rd < head_dim
        q = tl.load(q_ptr + bh * n_q * head_dim + rm[:, None] * head_dim + rd[None, :],
                    mask=(rm[:, None] < n_q) & d_ok[None, :], other=0)
        q_scale = tl.load(qs_ptr + bh * q_blocks + pid_m)
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for start in range(0, n_k, BLOCK_N):
            rn = start + rn0
            n_ok = rn < n_k
            k = tl.load(k_ptr + bh * n_k * head_dim + rn[None, :] * head_dim + rd[:, None],
                        mask=n_ok[None, :] & d_ok[:, None], other=0)
            k_scale = tl.load(ks_ptr + bh * k_blocks + start // BLOCK_N)
            s = tl.dot(q, k).to(tl.float32) * (q_scale * k_scale)
            valid = n_ok
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + batch * n_k + rn, mask=n_ok, other=0) != 0)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + bh * n_k * head_dim + rn[:, None] * head_dim + rd[None, :],
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
            m_i = m_new
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(out_ptr + bh * n_q * head_dim + rm[:, None] * head_dim + rd[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=(rm[:, None] < n_q) & d_ok[None, :])


def int8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    sm_scale: float | None = None, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
) -> torch.Tensor:
    """Triton INT8 attention: q (B, H, N_q, D), k/v (B, H, N_k, D), key_mask (B, N_k) bool -> like q."""
    require_triton()
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    if k.shape != (batch, heads, n_k, dim) or v.shape != k.shape:
        raise ConfigError(f"int8_attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_mask is not None and tuple(key_mask.shape) != (batch, n_k):
        raise ConfigError(f"key_mask must be (batch, n_k) = {(batch, n_k)}, got {tuple(key_mask.shape)}")
    q_codes, q_scale, k_codes, k_scale = prepare_qk(q, k, sm_scale, block_m, block_n)
    # Not empty_like: a permuted q (the model's heads view) would hand its strides to ``out``,
    # while the kernel writes (B, H, N_q, D) row-major.
    out = torch.empty(batch, heads, n_q, dim, dtype=q.dtype, device=q.device)
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else q_scale
    grid = (triton.cdiv(n_q, block_m), batch * heads)
    _int8_attention_kernel[grid](
        q_codes, k_codes, v.contiguous(), q_scale, k_scale, mask, out,
        heads, n_q, n_k, dim, q_scale.shape[-1], k_scale.shape[-1],
        HAS_MASK=key_mask is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_power_of_2(dim)),
    )
    return out
