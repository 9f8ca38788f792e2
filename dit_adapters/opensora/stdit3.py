"""Open-Sora 1.2 STDiT3, written with torch and einops only.

State-dict compatible with the published ``STDiT3-XL/2`` checkpoint folder
(``config.json`` + ``model.safetensors``, no key prefix). The forward pass follows the
upstream model: a spatial block (attention over the tokens of one frame) and a temporal
block (attention over the frames of one token, with RoPE after q/k RMSNorm) per depth
level, both modulated by the adaLN-single vector ``t_mlp = t_block(t)`` plus their own
``scale_shift_table``; cross-attention to the caption has no norm and no gate.

Where the time path lives (the temporal information block, TIB):
``STDiT3.time_embedding`` turns ``(timestep, fps)`` into ``t`` (used by the final layer)
and ``t_mlp`` (shared by every block).

Shapes: B batch, C hidden, T/H/W latent frames/height/width, S = H*W patches per frame,
N = T*S tokens, L caption tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dit_adapters.fused import norm_modulate_linear, norm_modulate_mlp

# Keys of an upstream ``config.json`` that describe transformers/HF bookkeeping or
# upstream-only performance switches; they are accepted and ignored.
IGNORED_CONFIG_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "torch_dtype",
        "transformers_version",
        "_name_or_path",
        "auto_map",
        "input_size",
        "enable_flash_attn",
        "enable_layernorm_kernel",
        "enable_sequence_parallelism",
        "only_train_temporal",
        "freeze_y_embedder",
        "drop_path",
    }
)


@dataclass(frozen=True)
class STDiT3Config:
    """Constructor arguments of :class:`STDiT3` (the fields of upstream ``STDiT3Config``)."""

    input_sq_size: int = 512
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    skip_y_embedder: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        problems = []
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            problems.append(f"patch_size must be three positive ints, got {self.patch_size}")
        if self.hidden_size % self.num_heads != 0:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        elif (self.hidden_size // self.num_heads) % 2 != 0:
            problems.append("head dim (hidden_size / num_heads) must be even for RoPE")
        if self.hidden_size % 4 != 0:
            problems.append(f"hidden_size must be divisible by 4 (2D sin-cos embedding), got {self.hidden_size}")
        for name in ("depth", "num_heads", "in_channels", "caption_channels", "model_max_length", "input_sq_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.skip_y_embedder:
            problems.append("skip_y_embedder=True is not supported by this port")
        if problems:
            raise ValueError("invalid STDiT3 config: " + "; ".join(problems))

    @property
    def out_channels(self) -> int:
        """Channels the model predicts: velocity (and a sigma half when ``pred_sigma``)."""
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        """Per-head channel count."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, raw: dict) -> STDiT3Config:
        """Build from an upstream or our own ``config.json`` dict; unknown keys are an error."""
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(raw) - known - IGNORED_CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"unknown STDiT3 config keys {unknown}; expected a subset of {sorted(known)} "
                f"(HF bookkeeping keys such as 'architectures' are ignored)"
            )
        values = {k: v for k, v in raw.items() if k in known}
        extra = {k: v for k, v in raw.items() if k in IGNORED_CONFIG_KEYS}
        return cls(**values, extra=extra)

    def to_dict(self) -> dict:
        """JSON-serializable dict in the upstream ``config.json`` style."""
        out = asdict(self)
        extra = out.pop("extra")
        out["patch_size"] = list(self.patch_size)
        out["architectures"] = ["STDiT3"]
        out["model_type"] = "STDiT3"
        for key in ("architectures", "model_type"):
            extra.pop(key, None)
        out.update(extra)
        return out


# --------------------------------------------------------------------------- helpers


def sinusoidal_embedding(values: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(M,) scalars -> (M, dim) embedding, cosine half first (upstream ``timestep_embedding``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class RMSNorm(nn.Module):
    """LLaMA-style RMSNorm computed in float32 (upstream ``LlamaRMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, ``rotary_embedding_torch`` convention (interleaved pairs).

    ``freqs`` is a non-trainable parameter so the key ``rope.freqs`` of the checkpoint loads.
    The cosine and sine of the first ``table_positions`` positions are kept as float32 tables
    (not saved; rebuilt when ``freqs`` loads or moves): a compiled graph would otherwise inline
    the trigonometry into its loop over every query and key element (on the CPU that loop of a
    temporal block went from 29.1 to 23.4 ms with the tables).
    """

    def __init__(self, dim: int, theta: float = 10000.0, table_positions: int = 256) -> None:
        super().__init__()
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.freqs = nn.Parameter(freqs, requires_grad=False)
        self.table_positions = table_positions
        self.register_buffer("cos_table", torch.empty(0), persistent=False)
        self.register_buffer("sin_table", torch.empty(0), persistent=False)
        self.refresh_tables()
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_tables())

    def angles(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """(seq_len, dim) rotation angles, each frequency repeated for its pair of channels."""
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        return torch.einsum("n,f->nf", positions, self.freqs.float()).repeat_interleave(2, dim=-1)

    @torch.no_grad()
    def refresh_tables(self) -> None:
        """Recompute the float32 cosine/sine tables from ``freqs`` on its device."""
        angles = self.angles(self.table_positions, self.freqs.device)
        self.cos_table, self.sin_table = angles.cos(), angles.sin()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        result = super()._apply(fn, recurse)
        self.refresh_tables()  # keep the tables float32 whatever dtype the model moves to
        return result

    def rotate_queries_or_keys(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate (..., seq, dim) by position along the sequence axis (second to last)."""
        seq_len = x.shape[-2]
        if seq_len <= self.table_positions:
            cos, sin = self.cos_table[:seq_len], self.sin_table[:seq_len]
        else:
            angles = self.angles(seq_len, x.device)
            cos, sin = angles.cos(), angles.sin()
        pairs = rearrange(x, "... (d r) -> ... d r", r=2)
        first, second = pairs.unbind(-1)
        rotated_half = rearrange(torch.stack((-second, first), dim=-1), "... d r -> ... (d r)")
        out = x.float() * cos + rotated_half.float() * sin
        return out.to(x.dtype)


class PositionEmbedding2D(nn.Module):
    """2D sin-cos embedding of the patch grid, rescaled by resolution (upstream semantics)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("inv_freq", self.inverse_frequencies(dim), persistent=False)

    @staticmethod
    def inverse_frequencies(dim: int) -> torch.Tensor:
        """The (dim/4,) frequencies of each half (height, width) of the embedding."""
        half_dim = dim // 2
        return 1.0 / (10000 ** (torch.arange(0, half_dim, 2).float() / half_dim))

    def _sin_cos(self, positions: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("i,d->id", positions, self.inv_freq)
        return torch.cat((out.sin(), out.cos()), dim=-1)

    def forward(self, h: int, w: int, scale: float, base_size: int | None, dtype: torch.dtype) -> torch.Tensor:
        """(1, h*w, dim) embedding, rows major."""
        device = self.inv_freq.device
        grid_h = torch.arange(h, device=device, dtype=torch.float32) / scale
        grid_w = torch.arange(w, device=device, dtype=torch.float32) / scale
        if base_size is not None:
            grid_h = grid_h * (base_size / h)
            grid_w = grid_w * (base_size / w)
        # Token order is row-major (h, w). As upstream, the first half of the channels encodes
        # the column (w) coordinate and the second half the row (h) coordinate.
        column = grid_w[None, :].expand(h, w).reshape(-1)
        row = grid_h[:, None].expand(h, w).reshape(-1)
        emb = torch.cat([self._sin_cos(column), self._sin_cos(row)], dim=-1)
        return emb.unsqueeze(0).to(dtype)


class Mlp(nn.Module):
    """fc1 -> tanh-GELU -> fc2 (timm ``Mlp`` key names)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# --------------------------------------------------------------------------- embedders


class PatchEmbed3D(nn.Module):
    """Video (B, C_in, T, H, W) -> tokens (B, N, C) with a strided Conv3d; pads to the patch grid."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pt, ph, pw = self.patch_size
        _, _, t, h, w = x.shape
        pad = (0, (-w) % pw, 0, (-h) % ph, 0, (-t) % pt)
        if any(pad):
            x = F.pad(x, pad)
        x = self.proj(x)  # (B, C, T', H', W')
        return rearrange(x, "B C T H W -> B (T H W) C")


class TimestepEmbedder(nn.Module):
    """Scalar -> 256-d sinusoid -> Linear, SiLU, Linear (keys ``mlp.0``, ``mlp.2``)."""

    frequency_dim = 256

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(self.frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        """(B,) -> (B, C)."""
        freq = sinusoidal_embedding(values, self.frequency_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class CaptionEmbedder(nn.Module):
    """Caption tokens (B, 1, L, C_cap) -> (B, 1, L, C); owns the null caption ``y_embedding``."""

    def __init__(self, caption_channels: int, hidden_size: int, uncond_prob: float, token_num: int) -> None:
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(token_num, caption_channels) / caption_channels**0.5)
        self.uncond_prob = uncond_prob

    def drop_captions(self, caption: torch.Tensor, drop_ids: torch.Tensor) -> torch.Tensor:
        """Replace the captions where ``drop_ids`` is true by the null caption (for guidance training)."""
        null = self.y_embedding.to(caption.dtype)[None, None]
        return torch.where(drop_ids[:, None, None, None], null, caption)

    def forward(self, caption: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.uncond_prob > 0 and force_drop_ids is None:
            force_drop_ids = torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
        if force_drop_ids is not None:
            caption = self.drop_captions(caption, force_drop_ids.bool())
        return self.y_proj(caption)


# --------------------------------------------------------------------------- attention


class SelfAttention(nn.Module):
    """Multi-head self-attention with q/k RMSNorm and optional RoPE (keys ``qkv``, ``q_norm``, ...)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        # A plain attribute, not a submodule: the RoPE table is owned (and saved) by STDiT3.
        self._rope = [rope] if rope is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B', n, C) -> (B', n, C) where n is the attended axis (patches or frames)."""
        return self.attend(self.qkv(x))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Attention and output projection from the projected (B', n, 3C) ``qkv``."""
        q, k, v = rearrange(qkv, "B n (three h d) -> three B h n d", three=3, h=self.num_heads).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self._rope:
            q = self._rope[0].rotate_queries_or_keys(q)
            k = self._rope[0].rotate_queries_or_keys(k)
        out = self.attention(q, k, v)
        return self.proj(rearrange(out, "B h n d -> B n (h d)"))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v; a separate method so quantizers can wrap the matmuls."""
        return F.scaled_dot_product_attention(q, k, v)


class CrossAttention(nn.Module):
    """Tokens attend to their own caption tokens; padding is masked (keys ``q_linear``, ``kv_linear``)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, N, C), cond (B, L, C), key_mask (B, L) bool (True = real token) or None."""
        q = rearrange(self.q_linear(x), "B N (h d) -> B h N d", h=self.num_heads)
        k, v = rearrange(self.kv_linear(cond), "B L (two h d) -> two B h L d", two=2, h=self.num_heads).unbind(0)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = self.attention(q, k, v, attn_mask)
        return self.proj(rearrange(out, "B h N d -> B N (h d)"))

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Masked softmax attention; a separate method so quantizers can wrap the matmuls."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


# --------------------------------------------------------------------------- blocks


class STDiT3Block(nn.Module):
    """One spatial or temporal block: modulated self-attention, cross-attention, modulated MLP."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, qk_norm: bool, temporal: bool,
        rope: RotaryEmbedding | None = None,
    ) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden_size, num_heads, qk_norm, rope if temporal else None)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, t_mlp: torch.Tensor, y_mask: torch.Tensor | None, T: int, S: int
    ) -> torch.Tensor:
        """x (B, T*S, C); y (B, L, C); t_mlp (B, 6C) -> (B, T*S, C)."""
        B = x.shape[0]
        modulation = self.scale_shift_table[None] + t_mlp.reshape(B, 6, -1)  # (B, 6, C)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)

        # qkv is applied per token, so it runs before the tokens are grouped by frame or by patch
        # position: the block input site stays LayerNorm -> modulate -> Linear, fusable as one.
        qkv = norm_modulate_linear(self.norm1, self.attn.qkv, x, shift_msa, scale_msa)  # (B, T*S, 3C)
        if self.temporal:  # attend over the T frames of each patch position
            qkv = rearrange(qkv, "B (T S) C -> (B S) T C", T=T, S=S)
            x_m = rearrange(self.attn.attend(qkv), "(B S) T C -> B (T S) C", T=T, S=S)
        else:  # attend over the S patches of each frame
            qkv = rearrange(qkv, "B (T S) C -> (B T) S C", T=T, S=S)
            x_m = rearrange(self.attn.attend(qkv), "(B T) S C -> B (T S) C", T=T, S=S)
        x = x + gate_msa * x_m

        x = x + self.cross_attn(x, y, y_mask)

        mlp = self.mlp
        return x + gate_mlp * norm_modulate_mlp(self.norm2, mlp.fc1, mlp.act, mlp.fc2, x, shift_mlp, scale_mlp)


class T2IFinalLayer(nn.Module):
    """LayerNorm, modulation by ``t`` (not ``t_mlp``), Linear to patch pixels."""

    def __init__(self, hidden_size: int, num_patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, num_patch * out_channels, bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return norm_modulate_linear(self.norm_final, self.linear, x, shift, scale)


# --------------------------------------------------------------------------- model


@dataclass
class STDiT3BlockInputs:
    """What every block needs, as :meth:`STDiT3.embed` returns it.

    ``x`` (B, N, C) tokens; ``y`` (B, L, C) caption; ``y_mask`` (B, L) bool or None;
    ``t`` (B, C) and ``t_mlp`` (B, 6C) temporal features; ``grid`` (T, H, W) patches;
    ``video_size`` (Tx, Hx, Wx) of the input latents.
    """

    x: torch.Tensor
    y: torch.Tensor
    y_mask: torch.Tensor | None
    t: torch.Tensor
    t_mlp: torch.Tensor
    grid: tuple[int, int, int]
    video_size: tuple[int, int, int]


class STDiT3(nn.Module):
    """Open-Sora 1.2 spatial-temporal DiT (see module docstring)."""

    def __init__(self, config: STDiT3Config) -> None:
        super().__init__()
        self.config = config
        c = config.hidden_size
        self.pos_embed = PositionEmbedding2D(c)
        self.rope = RotaryEmbedding(config.head_dim)

        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, c)
        self.t_embedder = TimestepEmbedder(c)
        self.fps_embedder = TimestepEmbedder(c)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c, bias=True))
        self.y_embedder = CaptionEmbedder(
            config.caption_channels, c, config.class_dropout_prob, config.model_max_length
        )

        def make_block(temporal: bool) -> STDiT3Block:
            return STDiT3Block(c, config.num_heads, config.mlp_ratio, config.qk_norm, temporal, self.rope)

        self.spatial_blocks = nn.ModuleList([make_block(False) for _ in range(config.depth)])
        self.temporal_blocks = nn.ModuleList([make_block(True) for _ in range(config.depth)])
        self.final_layer = T2IFinalLayer(c, math.prod(config.patch_size), config.out_channels)

    # ---------------------------------------------------------------- initialization
    def initialize_weights(self) -> None:
        """Upstream-style init for training from scratch (xavier linears, small embedders,
        temporal blocks and the output projection start at zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for embedder in (self.t_embedder, self.fps_embedder):
            nn.init.normal_(embedder.mlp[0].weight, std=0.02)
            nn.init.normal_(embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        for block in self.temporal_blocks:
            nn.init.zeros_(block.attn.proj.weight)
            nn.init.zeros_(block.mlp.fc2.weight)
        for block in self.spatial_blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
        nn.init.zeros_(self.final_layer.linear.weight)

    # ---------------------------------------------------------------- pieces of forward
    def time_embedding(self, timestep: torch.Tensor, fps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The temporal information block: ``(timestep (B,), fps (B,) or (1,))`` -> ``(t, t_mlp)``.

        ``t`` (B, C) modulates the final layer; ``t_mlp`` (B, 6C) every block.
        """
        B = timestep.shape[0]
        fps = fps.reshape(-1)
        if fps.shape[0] != B:
            fps = fps.repeat(B // fps.shape[0])
        t = self.t_embedder(timestep) + self.fps_embedder(fps)
        return t, self.t_block(t)

    def encode_text(self, y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1, L, C_cap) captions and (B', L) mask -> (B, L, C) and a (B, L) bool key mask.

        As upstream, a mask with fewer rows than ``y`` is repeated (guidance passes the null
        caption with the conditional caption's mask).
        """
        y = self.y_embedder(y).squeeze(1)
        if mask is None:
            return y, None
        if mask.shape[0] != y.shape[0]:
            mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        key_mask = mask.reshape(y.shape[0], -1).bool()
        if not bool(key_mask.any(dim=1).all()):
            raise ValueError("every caption needs at least one unmasked token (mask row of zeros)")
        return y, key_mask

    def patch_grid(self, x: torch.Tensor) -> tuple[int, int, int]:
        """Number of patches along (T, H, W) after padding to the patch size."""
        return tuple(math.ceil(n / p) for n, p in zip(x.shape[2:], self.config.patch_size, strict=True))  # type: ignore[return-value]

    def embed(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        height: torch.Tensor | None = None,
        width: torch.Tensor | None = None,
        **_: object,
    ) -> STDiT3BlockInputs:
        """Everything before the first block: tokens, caption, temporal features and grid sizes.

        Same arguments as :meth:`forward`; ``forward`` is ``embed``, the blocks, then ``head``.
        """
        if x_mask is not None:
            raise NotImplementedError("x_mask (frame conditioning) is not supported by this port")
        if fps is None:
            raise ValueError("STDiT3.forward needs fps (a tensor of frames per second, e.g. torch.tensor([24.]))")
        dtype = self.x_embedder.proj.weight.dtype
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        T, H, W = self.patch_grid(x)
        S = H * W

        if height is None or width is None:
            scale = 1.0
        else:
            scale = float((height.reshape(-1)[0] * width.reshape(-1)[0]) ** 0.5) / self.config.input_sq_size
        pos_emb = self.pos_embed(H, W, scale=scale, base_size=round(S**0.5), dtype=x.dtype)  # (1, S, C)

        t, t_mlp = self.time_embedding(timestep, fps.to(dtype))
        y, y_mask = self.encode_text(y, mask)

        tokens = self.x_embedder(x)  # (B, T*S, C)
        tokens = rearrange(tokens, "B (T S) C -> B T S C", T=T, S=S) + pos_emb[:, None]
        tokens = rearrange(tokens, "B T S C -> B (T S) C")
        return STDiT3BlockInputs(tokens, y, y_mask, t, t_mlp, (T, H, W), tuple(x.shape[2:]))  # type: ignore[arg-type]

    def blocks_in_order(self) -> list[STDiT3Block]:
        """Spatial and temporal blocks interleaved, in the order the forward pass runs them."""
        return [block for pair in zip(self.spatial_blocks, self.temporal_blocks, strict=True) for block in pair]

    def head(self, x: torch.Tensor, inputs: STDiT3BlockInputs) -> torch.Tensor:
        """Final layer and unpatchify: block output tokens -> (B, out_channels, T, H, W) float."""
        x = self.final_layer(x, inputs.t)  # (B, N, prod(patch) * C_out)
        return self.unpatchify(x, *inputs.grid, *inputs.video_size).float()

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        fps: torch.Tensor | None = None,
        height: torch.Tensor | None = None,
        width: torch.Tensor | None = None,
        **_: object,
    ) -> torch.Tensor:
        """Predict (B, out_channels, T, H, W) from latents x (B, in_channels, T, H, W) at ``timestep``.

        ``height``/``width`` are the pixel size of the video (they set the position-embedding
        scale; default: ``input_sq_size``); ``fps`` is required as upstream.
        """
        inputs = self.embed(x, timestep, y, mask, x_mask, fps, height, width)
        T, H, W = inputs.grid
        h = inputs.x
        for block in self.blocks_in_order():
            h = block(h, inputs.y, inputs.t_mlp, inputs.y_mask, T, H * W)
        return self.head(h, inputs)

    def unpatchify(self, x: torch.Tensor, T: int, H: int, W: int, Tx: int, Hx: int, Wx: int) -> torch.Tensor:
        """(B, N, pt*ph*pw*C_out) tokens -> (B, C_out, Tx, Hx, Wx) video (padding cropped)."""
        pt, ph, pw = self.config.patch_size
        x = rearrange(
            x,
            "B (Nt Nh Nw) (pt ph pw C) -> B C (Nt pt) (Nh ph) (Nw pw)",
            Nt=T, Nh=H, Nw=W, pt=pt, ph=ph, pw=pw, C=self.config.out_channels,
        )
        return x[:, :, :Tx, :Hx, :Wx]
