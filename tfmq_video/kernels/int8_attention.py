"""INT8 fused attention in the SageAttention (v1) design.

Q and K are quantized to int8 with one scale per tile of rows (BLOCK_M query rows, BLOCK_N key
rows: the kernel multiplies each int32 tile of ``Q K^T`` by one scalar), after K is smoothed by
subtracting its mean over tokens (softmax is invariant to a vector added to every key). ``sm_scale * log2(e)`` is folded into Q before quantization so the online softmax uses
``exp2``. ``Q K^T`` is an int8 dot into int32; ``P V`` runs in fp16 with fp32 accumulation. An
optional key padding mask (B, N_k) (True = real token) serves cross-attention to captions. Head
dims are padded to a power of two inside the kernel (64, 72 -> 128, 128). Every query row needs at
least one unmasked key.

On a GPU the preparation is one Triton pass per tensor that reads the model's strided head views
and writes int8 codes and scales (in PyTorch it took as long as the attention kernel itself on an
H100: 0.84 ms against 0.11 ms at 7800 tokens). Tiles: 128 x 64 (the best of session 10's H100
sweep at 7800 tokens, head dim 128), with 8 warps when the grid is too small to fill the GPU with
4-warp programs (at 1590 tokens 8 warps ran 1.4x and 1.7x faster in two runs). The tiles are not autotuned because
they are also the quantization blocks: a tuner would change the numbers. (Per-row scales gathered
inside the kernel, which would free the tiles, made it 1.4x slower.)
"""

from __future__ import annotations

import math

import torch

from tfmq_video.errors import ConfigError
from tfmq_video.kernels._triton import HAS_TRITON, next_power_of_2, require_triton

LOG2E = 1.4426950408889634
BLOCK_M = 128  # query rows per tile and per Q scale
BLOCK_N = 64  # key rows per tile and per K scale


def quantize_per_block(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, N, D) float -> int8 codes (B, H, N, D) and float32 scales (B, H, ceil(N / block))."""
    batch, heads, tokens, dim = x.shape
    blocks = math.ceil(tokens / block)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, blocks * block - tokens))
    grouped = padded.reshape(batch, heads, blocks, block, dim)
    scale = (grouped.abs().amax(dim=(-1, -2)) / 127.0).clamp(min=1e-8)
    codes = torch.clamp(torch.round(grouped / scale[..., None, None]), -127, 127).to(torch.int8)
    return codes.reshape(batch, heads, blocks * block, dim)[:, :, :tokens].contiguous(), scale.contiguous()


def softmax_factor(head_dim: int, sm_scale: float | None) -> float:
    """The factor folded into Q: the softmax scale (default 1/sqrt(head_dim)) times log2(e)."""
    return (1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale) * LOG2E


def scaled_smoothed_qk(q: torch.Tensor, k: torch.Tensor, sm_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel quantizes (float32): Q times the base-2 softmax factor, K minus its mean over tokens."""
    return q.float() * softmax_factor(q.shape[-1], sm_scale), k.float() - k.float().mean(dim=-2, keepdim=True)


def prepare_qk(
    q: torch.Tensor, k: torch.Tensor, sm_scale: float | None, block_m: int = BLOCK_M, block_n: int = BLOCK_N
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Smooth K, fold the softmax scale (base 2) into Q, quantize both per block (PyTorch reference)."""
    q_scaled, k_smooth = scaled_smoothed_qk(q, k, sm_scale)
    q_codes, q_scale = quantize_per_block(q_scaled, block_m)
    k_codes, k_scale = quantize_per_block(k_smooth, block_n)
    return q_codes, q_scale, k_codes, k_scale


def _dequantize_blocks(codes: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    return codes.float() * scale.repeat_interleave(block, dim=-1)[..., : codes.shape[-2], None]


def fake_quantize_per_block(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` (B, H, N, D) rounded to its int8 grid of one scale per ``block`` rows, as float32."""
    return _dequantize_blocks(*quantize_per_block(x, block), block)


def int8_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    sm_scale: float | None = None, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
) -> torch.Tensor:
    """Reference of :func:`int8_attention` (same quantization, dense softmax, P in fp16)."""
    q_codes, q_scale, k_codes, k_scale = prepare_qk(q, k, sm_scale, block_m, block_n)
    keys = _dequantize_blocks(k_codes, k_scale, block_n)
    logits = _dequantize_blocks(q_codes, q_scale, block_m) @ keys.transpose(-1, -2)
    mask = None if key_mask is None else key_mask.bool()[:, None, None, :]
    return attend_base2(logits, v, mask).to(q.dtype)


def attend_base2(logits: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(logits * ln 2) · V with P and V in fp16, as the kernel's P·V (float32 result);
    ``mask`` (True = attend) broadcasts against the logits."""
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits * math.log(2.0), dim=-1)
    return probs.half().float() @ v.half().float()


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _quantize_rows_kernel(
        x_ptr, mean_ptr, codes_ptr, scale_ptr, heads, n, head_dim, stride_b, stride_h, stride_n, factor,
        SUBTRACT_MEAN: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (block of rows, batch * head): read a strided (BLOCK, D) tile, optionally
        subtract the per-head mean row, scale, and write int8 codes (contiguous) and one scale."""
        block = tl.program_id(0)
        bh = tl.program_id(1)
        rows = block * BLOCK + tl.arange(0, BLOCK)
        rd = tl.arange(0, BLOCK_D)
        valid = (rows[:, None] < n) & (rd[None, :] < head_dim)
        base = x_ptr + (bh // heads) * stride_b + (bh % heads) * stride_h
        x = tl.load(base + rows[:, None] * stride_n + rd[None, :], mask=valid, other=0.0).to(tl.float32)
        if SUBTRACT_MEAN:
            mean = tl.load(mean_ptr + bh * head_dim + rd, mask=rd < head_dim, other=0.0)
            x = tl.where(valid, x - mean[None, :], 0.0)
        x = x * factor
        scale = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0) / 127.0, 1e-8)
        scaled = x / scale
        codes = tl.where(scaled >= 0, tl.floor(scaled + 0.5), -tl.floor(-scaled + 0.5))
        codes = tl.minimum(tl.maximum(codes, -127.0), 127.0)
        tl.store(codes_ptr + bh * n * head_dim + rows[:, None] * head_dim + rd[None, :], codes.to(tl.int8), mask=valid)
        tl.store(scale_ptr + bh * tl.num_programs(0) + block, scale)

    @triton.jit
    def _int8_attention_kernel(
        q_ptr, k_ptr, v_ptr, qs_ptr, ks_ptr, mask_ptr, out_ptr,
        heads, n_q, n_k, head_dim, q_blocks, k_blocks, v_stride_b, v_stride_h, v_stride_n,
        HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One program per (query tile, batch * head): online softmax over key tiles. Q/K codes are
        contiguous (B, H, N, D) with one scale per tile; v may be a strided head view."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        batch = bh // heads
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rd = tl.arange(0, BLOCK_D)
        rn0 = tl.arange(0, BLOCK_N)
        d_ok = rd < head_dim
        m_ok = rm < n_q
        q = tl.load(q_ptr + bh * n_q * head_dim + rm[:, None] * head_dim + rd[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0)
        q_scale = tl.load(qs_ptr + bh * q_blocks + pid_m)
        v_base = v_ptr + batch * v_stride_b + (bh % heads) * v_stride_h
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
            v = tl.load(v_base + rn[:, None] * v_stride_n + rd[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
            m_i = m_new
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(out_ptr + bh * n_q * head_dim + rm[:, None] * head_dim + rd[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The kernels take any batch/head/token strides but need unit stride along the head dim."""
    return x if x.stride(-1) == 1 else x.contiguous()


def quantize_qk(
    q: torch.Tensor, k: torch.Tensor, sm_scale: float | None, block_m: int = BLOCK_M, block_n: int = BLOCK_N
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton form of :func:`prepare_qk`: one pass over each of q and k (any head-view strides)."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    k_mean = k.float().mean(dim=-2).contiguous()  # (B, H, D)
    out = []
    for x, factor, subtract, block in ((q, softmax_factor(q.shape[-1], sm_scale), False, block_m),
                                       (k, 1.0, True, block_n)):
        batch, heads, tokens, dim = x.shape
        blocks = triton.cdiv(tokens, block)
        codes = torch.empty(batch, heads, tokens, dim, dtype=torch.int8, device=x.device)
        scales = torch.empty(batch, heads, blocks, dtype=torch.float32, device=x.device)
        if tokens and batch * heads:
            _quantize_rows_kernel[(blocks, batch * heads)](
                x, k_mean, codes, scales, heads, tokens, dim, x.stride(0), x.stride(1), x.stride(2), factor,
                SUBTRACT_MEAN=subtract, BLOCK=block, BLOCK_D=next_power_of_2(dim),
            )
        out += [codes, scales]
    return out[0], out[1], out[2], out[3]


def attention_warps(programs: int, device: torch.device) -> int:
    """4 warps per program when the grid fills the GPU twice over, else 8 (session 10's H100 sweep:
    732 programs ran best with 4, 208 programs 1.4-1.7x faster with 8 than with 4)."""
    if device.type != "cuda":
        return 4
    return 4 if programs >= 2 * torch.cuda.get_device_properties(device).multi_processor_count else 8


def int8_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    sm_scale: float | None = None, block_m: int = BLOCK_M, block_n: int = BLOCK_N,
) -> torch.Tensor:
    """Triton INT8 attention: q (B, H, N_q, D), k/v (B, H, N_k, D), key_mask (B, N_k) bool -> like q.

    ``block_m``/``block_n``: the query/key tiles, which are also the Q/K quantization blocks
    (powers of two >= 16; :func:`int8_attention_ref` with the same blocks is the reference).
    """
    require_triton()
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    if k.shape != (batch, heads, n_k, dim) or v.shape != k.shape:
        raise ConfigError(f"int8_attention shapes do not fit: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_mask is not None and tuple(key_mask.shape) != (batch, n_k):
        raise ConfigError(f"key_mask must be (batch, n_k) = {(batch, n_k)}, got {tuple(key_mask.shape)}")
    for label, size in (("block_m", block_m), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ConfigError(f"int8_attention {label}={size}: tiles must be powers of two >= 16")
    q_codes, q_scale, k_codes, k_scale = quantize_qk(q, k, sm_scale, block_m, block_n)
    v = _last_dim_contiguous(v)
    # Not empty_like: a permuted q (the model's heads view) would hand its strides to ``out``,
    # while the kernel writes (B, H, N_q, D) row-major.
    out = torch.empty(batch, heads, n_q, dim, dtype=q.dtype, device=q.device)
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else q_scale
    grid = (triton.cdiv(n_q, block_m), batch * heads)
    _int8_attention_kernel[grid](
        q_codes, k_codes, v, q_scale, k_scale, mask, out, heads, n_q, n_k, dim, q_scale.shape[-1],
        k_scale.shape[-1], v.stride(0), v.stride(1), v.stride(2),
        # the int8 Q K^T dot runs over the padded head dim, which must be >= 32 on the tensor cores
        HAS_MASK=key_mask is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(32, next_power_of_2(dim)),
        num_warps=attention_warps(grid[0] * grid[1], q.device),
    )
    return out
