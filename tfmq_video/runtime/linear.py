"""QuantLinear: a Linear with integer weights (W8 or packed W4) and quantized activations.

Built from a :class:`~tfmq_video.quant.records.QuantizedLinearRecord`. Its buffers are the
exported tensors (int8 codes or packed int4 bytes, float32 scales and zero points, bias,
static or per-timestep activation parameters), so ``state_dict`` is the checkpoint content.
The backend (see :mod:`tfmq_video.runtime.backends`) decides how ``forward`` computes:
every backend implements the same math, ``reference`` in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tfmq_video.errors import ConfigError
from tfmq_video.export.packing import pack_int4, unpack_int4
from tfmq_video.kernels.intmath import weight_correction
from tfmq_video.quant.affine import (
    IntRange,
    code_dtype,
    dequantize,
    factor_group_scales,
    group_multiplier_limit,
    int8_offset,
    minmax_qparams,
    quantize,
)
from tfmq_video.quant.context import TimestepContext
from tfmq_video.quant.records import ActivationRecord, QuantizedLinearRecord
from tfmq_video.runtime import int_ops
from tfmq_video.runtime.backends import resolve_backend, warn_once


def stored_weight_codes(name: str, codes: torch.Tensor, grid: IntRange) -> torch.Tensor:
    """A record's weight codes in their storage dtype (:func:`weight_code_dtype`), range-checked.

    Records hold integer codes of any integer dtype. Unsigned 8-bit codes given as int8 (what
    ``codes.to(torch.int8)`` makes of 128..255) are read as their uint8 bit pattern.
    """
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ConfigError(f"{name}: weight codes must be an integer tensor, got {codes.dtype}")
    dtype = code_dtype(grid)
    if dtype == torch.uint8 and codes.dtype == torch.int8:
        return codes.view(torch.uint8)
    if codes.numel():
        lo, hi = int(codes.min()), int(codes.max())
        if lo < grid.qmin or hi > grid.qmax:
            kind = "signed" if grid.signed else "unsigned"
            raise ConfigError(
                f"{name}: weight codes span [{lo}, {hi}], outside the {kind} {grid.bits}-bit range "
                f"[{grid.qmin}, {grid.qmax}]"
            )
    return codes.to(dtype)


def onednn_post_op(activation: nn.Module) -> tuple[str, str] | None:
    """oneDNN's (post-op, algorithm) computing ``activation``, or None when it has none we use."""
    if isinstance(activation, nn.GELU):
        return "gelu", "tanh" if activation.approximate == "tanh" else "none"
    return None


class QuantLinear(nn.Module):
    """Integer-weight Linear with backends ``reference``, ``cpu`` and ``triton`` (see module docstring)."""

    def __init__(
        self,
        record: QuantizedLinearRecord,
        context: TimestepContext | None = None,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.compute_dtype = dtype  # the dtype of ``weight``; follows model.to(dtype) like the FP parts
        codes = record.weight_codes
        if codes.dim() != 2:
            raise ConfigError(f"{record.name}: weight codes must be 2-D (out, in), got {tuple(codes.shape)}")
        self.name = record.name
        self.out_features, self.in_features = codes.shape
        self.weight_grid = IntRange(record.weight_bits, record.weight_signed)
        codes = stored_weight_codes(record.name, codes, self.weight_grid)
        self.group_size = record.group_size
        self.activation = ActivationRecord(record.activation.mode, record.activation.bits, record.activation.signed)
        self.act_grid = IntRange(record.activation.bits, record.activation.signed)
        self.original_shape = record.original_shape
        if record.weight_bits == 4:
            self.register_buffer("weight_packed", pack_int4(codes, record.weight_signed))
        else:  # int8, or uint8 for unsigned 8-bit codes (0..255)
            self.register_buffer("weight_codes", codes.contiguous())
        groups = 1 if record.group_size is None else self.in_features // record.group_size
        expected = (self.out_features, groups)
        for label, tensor in (("weight_scale", record.weight_scale), ("weight_zero_point", record.weight_zero_point)):
            if tuple(tensor.shape) != expected:
                raise ConfigError(f"{record.name}: {label} has shape {tuple(tensor.shape)}, expected {expected}")
        self.register_buffer("weight_scale", record.weight_scale.float().contiguous())
        self.register_buffer("weight_zero_point", record.weight_zero_point.float().contiguous())
        self.register_buffer("bias", None if record.bias is None else record.bias.float().contiguous())
        self._register_activation(record.activation)
        self.context = context
        self._cache: dict[str, object] = {}
        self.backend = "reference"
        self.set_backend(backend)

    # ------------------------------------------------------------------ construction helpers
    def _register_activation(self, act: ActivationRecord) -> None:
        mode = act.mode
        if mode not in ("static", "per_timestep", "dynamic_per_token", "none"):
            raise ConfigError(f"{self.name}: unknown activation mode {mode!r}")
        if mode in ("static", "per_timestep"):
            if act.scale is None:
                raise ConfigError(f"{self.name}: activation mode {mode!r} needs a calibrated scale")
            scale = act.scale.float().reshape(-1 if mode == "per_timestep" else ())
            zero = torch.zeros_like(scale) if act.zero_point is None else act.zero_point.float().reshape(scale.shape)
            self.register_buffer("act_scale", scale.contiguous())
            self.register_buffer("act_zero_point", zero.contiguous())
        else:
            self.act_scale = None
            self.act_zero_point = None

    def to_record(self) -> QuantizedLinearRecord:
        """The hand-off record these buffers represent (unpacked int8 codes)."""
        act = ActivationRecord(
            self.activation.mode, self.activation.bits, self.activation.signed, self.act_scale, self.act_zero_point
        )
        return QuantizedLinearRecord(
            name=self.name, weight_codes=self.codes(), weight_scale=self.weight_scale,
            weight_zero_point=self.weight_zero_point, weight_bits=self.weight_grid.bits,
            weight_signed=self.weight_grid.signed, group_size=self.group_size, bias=self.bias, activation=act,
            original_shape=self.original_shape,
        )

    # ------------------------------------------------------------------ weights
    def codes(self) -> torch.Tensor:
        """The weight codes (out, in): int8, uint8 for unsigned 8-bit (unpacked for W4)."""
        if self.weight_grid.bits == 4:
            return unpack_int4(self.weight_packed, self.in_features, self.weight_grid.signed)
        return self.weight_codes

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in ``compute_dtype``, in the original layer's shape.

        Models read it for its dtype (e.g. STDiT3's timestep embedder); the forward never uses it.
        """
        return self._float_weight(self.compute_dtype).reshape(self.original_shape or (self.out_features, -1))

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the codes represent, (out, in)."""
        groups = self.weight_scale.shape[1]
        codes = self.codes().float().reshape(self.out_features, groups, -1)
        weight = (codes - self.weight_zero_point.unsqueeze(-1)) * self.weight_scale.unsqueeze(-1)
        return weight.reshape(self.out_features, self.in_features)

    def weight_bytes(self) -> int:
        """Bytes of the stored quantized weight tensors (codes, scales, zero points, bias)."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if not name.startswith("act_"))

    def backend_cache_bytes(self) -> int:
        """Extra bytes the current backend keeps (e.g. unpacked or transposed weights)."""
        return sum(t.numel() * t.element_size() for t in self._cache.values() if torch.is_tensor(t))

    # ------------------------------------------------------------------ backends
    def unsupported(self, backend: str) -> str | None:
        """Why ``backend`` cannot run this layer's scheme, or None."""
        if backend == "triton" and self.activation.mode != "none":
            if self.weight_grid.bits not in (4, 8) and self.group_size is not None:
                return f"{self.weight_grid.bits}-bit per-group weights"
            if self.weight_grid.bits == 8 and self.group_size is not None:
                return "per-group W8 (the W8A8 kernel is per-channel)"
        return None

    def set_backend(self, requested: str) -> str:
        """Select the backend (``auto`` or a name); returns the one in use."""
        device = self.weight_scale.device
        name = resolve_backend(requested, device)
        problem = self.unsupported(name)
        if problem is not None:
            if requested != "auto":
                raise ConfigError(f"{self.name}: backend {name!r} does not support {problem}")
            warn_once(f"backend {name!r} does not support {problem}; such layers use 'reference'")
            name = "reference"
        self.backend = name
        self._prepare()
        return name

    def _prepare(self) -> None:
        """Build the backend's prepared weights now, so forward (and a compiled graph) only reads them."""
        self._cache.clear()
        if self.backend == "cpu" and self.activation.mode != "none":
            self._integer_weight()
        elif self.backend == "triton" and self.activation.mode != "none":
            self._prepare_triton()
        self._prepare_activation()

    def _prepare_triton(self) -> None:
        """The GEMM kernels' weight operands: int8 codes (W8) or the W4A8 split layout, the zero
        points shifted into int8 (None when all zero) and the correction term of input zero points."""
        from tfmq_video.kernels import w4a8_gemm

        offset = int8_offset(self.weight_grid)
        zero = self.weight_zero_point - offset
        has_zero = bool((zero != 0).any())
        codes = self.codes()
        shifted = codes if offset == 0 else (codes.to(torch.int16) - offset).to(torch.int8)
        self._cache["correction"] = weight_correction(shifted, self.weight_scale, zero)
        if self.weight_grid.bits == 4:
            self._cache["w4_split"] = w4a8_gemm.split_int4(self.weight_packed, self.in_features, zero.shape[1])
            self._cache["w_zero_raw"] = self.weight_zero_point if has_zero else None
        else:
            self._cache["w8_codes"] = shifted.contiguous()
            self._cache["w_zero_shifted"] = zero.contiguous() if has_zero else None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """Moves keep every buffer's dtype: ``model.to(torch.bfloat16)`` must not round the scales."""

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out if out.dtype == t.dtype else out.to(t.dtype)

        if hasattr(self, "compute_dtype"):
            self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight_scale.device)).dtype
        result = super()._apply(keep_dtype, recurse)
        if hasattr(self, "_cache"):
            self._prepare()  # moved buffers invalidate prepared weights
        return result

    # ------------------------------------------------------------------ activations
    def _prepare_activation(self) -> None:
        """Decide the data-dependent branches of the static paths once, not per call (no graph break)."""
        if self.act_zero_point is not None:
            shifted = self.act_zero_point - int8_offset(self.act_grid)
            self._cache["act_zero_shifted"] = bool((shifted != 0).any())

    def _static_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibrated per-tensor scale and zero point (0-d tensors) of the current step.

        Per-timestep parameters are selected with the context's index *tensor*, so a compiled
        graph reads the step as data: one graph serves every step (a Python int would be guarded
        on and recompile the graph at every step).
        """
        if self.activation.mode == "static":
            return self.act_scale, self.act_zero_point
        if self.context is None:
            raise ConfigError(f"{self.name}: per-timestep activation parameters need a TimestepContext")
        index = self.context.index_tensor  # an error if no timestep was set
        if not torch.compiler.is_compiling():  # eager range check: compiled code must not read the int
            step = self.context.index
            if step >= self.act_scale.shape[0]:
                raise ConfigError(
                    f"{self.name}: step {step} but only {self.act_scale.shape[0]} calibrated steps"
                )
        if index.device != self.act_scale.device:
            index = index.to(self.act_scale.device)
        index = index.reshape(1)
        scale = self.act_scale.index_select(0, index).reshape(())
        return scale, self.act_zero_point.index_select(0, index).reshape(())

    def fake_quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The reference activation quantization (quantize then dequantize) in float32."""
        x = x.float()
        grid = self.act_grid
        if self.activation.mode == "none":
            return x
        if self.activation.mode == "dynamic_per_token":
            scale, zero = minmax_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), grid)
        else:
            scale, zero = self._static_params()
        return dequantize(quantize(x, scale, zero, grid), scale, zero)

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Integer input: int8 codes (M, K), scales (M, 1) or scalar, int8-shifted zero points or None."""
        grid, offset = self.act_grid, int8_offset(self.act_grid)
        if self.activation.mode == "dynamic_per_token":
            if grid.signed:
                codes, scale = int_ops.fused(int_ops.quant_per_token_symmetric)(x2d, float(grid.qmax))
                return codes, scale, None
            return int_ops.fused(int_ops.quant_per_token_asymmetric)(x2d, float(grid.qmin), float(grid.qmax), float(offset))
        scale, zero = self._static_params()
        codes = int_ops.fused(int_ops.quant_static)(x2d, scale, zero, float(grid.qmin), float(grid.qmax), float(offset))
        shifted = (zero - offset).reshape(1, 1) if self._cache.get("act_zero_shifted", True) else None
        return codes, scale.reshape(1, 1), shifted

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) -> (..., out_features) in the input's dtype."""
        shape = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        if self.backend == "reference":
            out = F.linear(self.fake_quantize_input(x2d), self._reference_weight(), self.bias)
        elif self.activation.mode == "none":
            out = F.linear(x2d, self._float_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        elif self.backend == "cpu":
            out = self._forward_cpu(x2d)
        else:
            out = self._forward_triton(x2d)
        return out.to(x.dtype).reshape(*shape, self.out_features)

    def _reference_weight(self) -> torch.Tensor:
        if "reference" not in self._cache and torch.compiler.is_compiling():
            # filling the cache inside a graph would make the next call recompile it
            return self.dequantized_weight()
        if "reference" not in self._cache:
            self._cache["reference"] = self.dequantized_weight()
        return self._cache["reference"]  # type: ignore[return-value]

    def _float_weight(self, dtype: torch.dtype) -> torch.Tensor:
        key = f"float_{dtype}"
        if key not in self._cache:
            self._cache[key] = self.dequantized_weight().to(dtype)
        return self._cache[key]  # type: ignore[return-value]

    def integer_group_factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(row_scale (out, 1), multipliers (out, G))`` when the layer's group scales are integer
        multiples of one scale per row on a symmetric grid whose codes times the multipliers fit in
        int8 (weights calibrated with ``integer_group_scales``), else None."""
        if self.group_size is None or not self.weight_grid.signed or self.weight_grid.bits >= 8:
            return None
        if bool((self.weight_zero_point != 0).any()):
            return None
        return factor_group_scales(self.weight_scale, group_multiplier_limit(self.weight_grid))

    def _integer_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The integer GEMM's weight: int8 codes (out, in), scales and zero points (out, G), zero points
        shifted like the codes. Integer group scales are folded into the codes, so G is 1 for them."""
        factors = self.integer_group_factors()
        if factors is not None:
            row_scale, multipliers = factors
            grouped = self.codes().to(torch.int16).reshape(self.out_features, multipliers.shape[1], -1)
            codes = (grouped * multipliers.to(torch.int16).unsqueeze(-1)).reshape(self.out_features, -1)
            return codes.to(torch.int8), row_scale.float(), torch.zeros_like(row_scale, dtype=torch.float32)
        offset = int8_offset(self.weight_grid)
        codes = (self.codes().to(torch.int16) - offset).to(torch.int8)
        return codes, self.weight_scale, self.weight_zero_point - offset

    def _integer_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """int8 codes (in, out) shifted into int8, their scales and zero points (G, out), and the correction C."""
        if "w_t" not in self._cache:
            codes, weight_scale, zero = self._integer_operands()
            self._cache["w_t"] = codes.t().contiguous()
            self._cache["w_zero"] = zero.t().contiguous() if bool((zero != 0).any()) else None
            self._cache["w_scale"] = weight_scale.t().contiguous()
            self._cache["correction"] = weight_correction(codes, weight_scale, zero)
            if self.backend == "cpu" and self._cache["w_zero"] is None and zero.shape[1] == 1 and int_ops.onednn_available():
                self._cache["onednn"] = int_ops.onednn_prepack(codes)
                self._cache["onednn_scale"] = weight_scale.reshape(-1).contiguous()
        return self._cache["w_t"], self._cache["w_scale"], self._cache["w_zero"]  # type: ignore[return-value]

    def _forward_cpu(self, x2d: torch.Tensor) -> torch.Tensor:
        w_t, w_scale, w_zero = self._integer_weight()
        mode, grid = self.activation.mode, self.act_grid
        if "onednn" in self._cache and grid.bits == 8:
            return self._forward_onednn(x2d)
        per_channel = w_scale.shape[0] == 1 and w_zero is None
        if per_channel and mode == "dynamic_per_token" and grid.signed:
            return int_ops.fused(int_ops.linear_per_token)(x2d, w_t, w_scale, self.bias, float(grid.qmax))
        if per_channel and mode in ("static", "per_timestep"):
            scale, zero = self._static_params()
            return int_ops.fused(int_ops.linear_static)(
                x2d, w_t, w_scale, self.bias, scale, zero, self._cache["correction"],
                float(grid.qmin), float(grid.qmax), float(int8_offset(grid)),
            )
        codes, x_scale, x_zero = self.quantize_input(x2d)
        correction = self._cache["correction"] if x_zero is not None else None
        return self._grouped_cpu(codes, x_scale, x_zero, w_t, w_scale, w_zero, correction)  # type: ignore[arg-type]

    def _forward_onednn(self, x2d: torch.Tensor) -> torch.Tensor:
        """Prepacked oneDNN GEMM (u8 activations, per-channel s8 weights, fused weight dequantization).

        Static scales go into the GEMM whole; a per-token scale is applied after it, fused with the bias.
        """
        packed, w_scale, grid = self._cache["onednn"], self._cache["onednn_scale"], self.act_grid
        out_dtype = x2d.dtype if x2d.dtype in (torch.float32, torch.bfloat16) else torch.float32
        if self.activation.mode == "dynamic_per_token" and grid.signed:
            codes, x_scale = int_ops.fused(int_ops.quant_per_token_u8)(x2d, float(grid.qmax))
            one, zero_point = torch.ones((), dtype=torch.float32), torch.full((), 128, dtype=torch.int64)
            y = int_ops.onednn_qlinear(codes, one, zero_point, packed, w_scale, None, out_dtype)
            return int_ops.fused(int_ops.rescale_rows)(y, x_scale, self.bias, out_dtype)
        if self.activation.mode in ("static", "per_timestep"):
            codes, scale, zero_u8 = self._onednn_static_input(x2d)
            return int_ops.onednn_qlinear(codes, scale, zero_u8, packed, w_scale, self.bias, out_dtype)
        codes, x_scale, x_zero = self.quantize_input(x2d)
        w_t, w_scale_t, _ = self._integer_weight()
        correction = self._cache["correction"] if x_zero is not None else None
        return self._grouped_cpu(codes, x_scale, x_zero, w_t, w_scale_t, None, correction)  # type: ignore[arg-type]

    def _onednn_static_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """u8 codes of a static / per-timestep input, with the scale and the u8 zero point oneDNN takes."""
        grid = self.act_grid
        scale, zero = self._static_params()
        codes = int_ops.fused(int_ops.quant_static_u8)(x2d, scale, zero, float(grid.qmin), float(grid.qmax))
        return codes, scale.float(), self._u8_zero(zero)

    def _u8_zero(self, zero: torch.Tensor) -> torch.Tensor:
        """The zero point of this layer's input codes once shifted into uint8 (int64, as oneDNN takes it)."""
        return (zero + (128.0 if self.act_grid.signed else 0.0)).round().to(torch.int64)

    def _grouped_cpu(
        self, codes: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor | None, w_t: torch.Tensor,
        w_scale: torch.Tensor, w_zero: torch.Tensor | None, correction: torch.Tensor,
    ) -> torch.Tensor:
        """Per-group (or asymmetric-weight) CPU path: one ``_int_mm`` per group, float accumulation."""
        groups = w_scale.shape[0]
        length = self.in_features // groups
        out = torch.zeros(codes.shape[0], self.out_features, dtype=torch.float32, device=codes.device)
        for g in range(groups):
            cols = slice(g * length, (g + 1) * length)
            part = torch._int_mm(codes[:, cols].contiguous(), w_t[cols]).float()
            if w_zero is not None:
                part -= codes[:, cols].sum(-1, keepdim=True, dtype=torch.int32).float() * w_zero[g]
            out += part * w_scale[g]
        if x_zero is not None:
            out -= x_zero * correction
        out *= x_scale
        return out if self.bias is None else out + self.bias

    def _forward_triton(self, x2d: torch.Tensor) -> torch.Tensor:
        from tfmq_video.kernels import act_quant

        if self.activation.mode == "dynamic_per_token" and self.act_grid.signed and self.act_grid.bits == 8:
            codes, x_scale = act_quant.per_token_quant(x2d)
            x_zero = None
        elif self.activation.mode in ("static", "per_timestep"):
            codes, x_scale, x_zero = self._triton_static_quant(lambda *params: act_quant.static_quant(x2d, *params))
        else:
            codes, x_scale, x_zero = self.quantize_input(x2d)
            x_scale = x_scale.expand(codes.shape[0], 1)
            x_zero = None if x_zero is None else x_zero.expand(codes.shape[0], 1)
        return self._triton_gemm(codes, x_scale, x_zero, x2d.dtype)

    def _triton_static_quant(
        self, quantize: Callable[[torch.Tensor, torch.Tensor, int, int, int], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Codes of a static / per-timestep input from a Triton ``quantize(scale, zero, qmin, qmax,
        offset)``, with the one scale and int8-shifted zero point (None when zero) the GEMM takes."""
        grid, offset = self.act_grid, int8_offset(self.act_grid)
        act_scale, act_zero = self._static_params()
        codes = quantize(act_scale, act_zero, grid.qmin, grid.qmax, offset)
        shifted = self._cache.get("act_zero_shifted", True)
        return codes, act_scale, (act_zero - offset) if shifted else None

    def _triton_gemm(
        self, codes: torch.Tensor, x_scale: torch.Tensor, x_zero: torch.Tensor | None, in_dtype: torch.dtype
    ) -> torch.Tensor:
        """The W8A8/W4A8 Triton GEMM on int8 input codes (M, K) with per-row scales and zero points."""
        from tfmq_video.kernels import w4a8_gemm, w8a8_gemm

        out_dtype = in_dtype if in_dtype in (torch.float16, torch.float32, torch.bfloat16) else torch.float32
        common = {"bias": self.bias, "x_zero": x_zero, "correction": self._cache["correction"], "out_dtype": out_dtype}
        if self.weight_grid.bits == 4:
            return w4a8_gemm.w4a8_gemm(
                codes, x_scale, self.weight_packed, self.in_features, self.weight_grid.signed, self.weight_scale,
                w_zero=self._cache["w_zero_raw"], w_split=self._cache["w4_split"], **common,
            )
        return w8a8_gemm.w8a8_gemm(codes, x_scale, self._cache["w8_codes"], self.weight_scale,
                                   w_zero=self._cache["w_zero_shifted"], **common)

    # ------------------------------------------------------------------ fused MLP (cpu)
    def _takes_static_u8_on_onednn(self) -> bool:
        """cpu backend with the prepacked oneDNN GEMM, and a calibrated 8-bit per-tensor input scale."""
        return (self.backend == "cpu" and "onednn" in self._cache and self.act_grid.bits == 8
                and self.activation.mode in ("static", "per_timestep"))

    def emits_codes_for(self, activation: nn.Module, consumer: nn.Module) -> bool:
        """Whether :meth:`forward_activation_codes` can apply ``activation`` and ``consumer``'s input
        quantization inside this layer's oneDNN GEMM (see :mod:`dit_adapters.fused`): both layers on
        the cpu backend with oneDNN and calibrated 8-bit per-tensor inputs (static or per timestep),
        and an activation oneDNN has as a post-op (GELU, exact or tanh)."""
        return (isinstance(consumer, QuantLinear) and onednn_post_op(activation) is not None
                and self._takes_static_u8_on_onednn() and consumer._takes_static_u8_on_onednn())

    def forward_activation_codes(self, x: torch.Tensor, activation: nn.Module, consumer: nn.Module) -> torch.Tensor:
        """``consumer``'s uint8 input codes of ``activation(self(x))``, (..., out_features), computed by
        one oneDNN GEMM with the activation and the output quantization as post-ops."""
        if not self.emits_codes_for(activation, consumer):
            raise ConfigError(f"{self.name}: cannot emit the input codes of {getattr(consumer, 'name', consumer)} "
                              f"after {activation} (needs the cpu backend with oneDNN and static 8-bit inputs)")
        assert isinstance(consumer, QuantLinear)
        post_op, algorithm = onednn_post_op(activation)  # type: ignore[misc]
        x2d = x.reshape(-1, self.in_features)
        codes, scale, zero_u8 = self._onednn_static_input(x2d)
        out_scale, out_zero = consumer._static_params()
        out = int_ops.onednn_qlinear_codes(
            codes, scale, zero_u8, self._cache["onednn"], self._cache["onednn_scale"], self.bias,
            out_scale.float(), consumer._u8_zero(out_zero), post_op, algorithm,
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward_codes(self, codes: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The layer's output, in ``out_dtype`` (float32 or bfloat16), from the uint8 input codes that
        :meth:`forward_activation_codes` wrote for it."""
        scale, zero = self._static_params()
        codes2d = codes.reshape(-1, self.in_features)
        gemm_dtype = out_dtype if out_dtype in (torch.float32, torch.bfloat16) else torch.float32
        out = int_ops.onednn_qlinear(codes2d, scale.float(), self._u8_zero(zero), self._cache["onednn"],
                                     self._cache["onednn_scale"], self.bias, gemm_dtype)
        return out.to(out_dtype).reshape(*codes.shape[:-1], self.out_features)

    # ------------------------------------------------------------------ fused block input
    def fuses_norm_modulate(self) -> bool:
        """Whether :meth:`forward_norm_modulate` runs the fused Triton kernel: the triton backend, and
        activations that are static / per timestep, or dynamic per token on the signed 8-bit grid."""
        if self.backend != "triton":
            return False
        mode, grid = self.activation.mode, self.act_grid
        return mode in ("static", "per_timestep") or (mode == "dynamic_per_token" and grid.signed and grid.bits == 8)

    def forward_norm_modulate(
        self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """``self(LayerNorm(x) * (1 + scale) + shift)`` with the norm, the modulation and the
        activation quantization in one Triton pass (see :mod:`dit_adapters.fused`); x (B, L, C),
        shift/scale (B or 1, 1, C). Call it only when :meth:`fuses_norm_modulate` is true."""
        from tfmq_video.kernels import act_quant

        if not self.fuses_norm_modulate():
            raise ConfigError(f"{self.name}: the fused LayerNorm + modulate input needs the triton backend "
                              f"and 8-bit dynamic or static activations (backend {self.backend}, "
                              f"activation {self.activation.mode} {self.act_grid.bits}-bit)")
        batch, length, _ = x.shape
        if self.activation.mode == "dynamic_per_token":
            codes, x_scale = act_quant.layernorm_modulate_quant(x, shift, scale, eps)
            x_zero = None
        else:
            codes, x_scale, x_zero = self._triton_static_quant(
                lambda *params: act_quant.layernorm_modulate_quant_static(x, shift, scale, eps, *params))
        out = self._triton_gemm(codes, x_scale, x_zero, x.dtype)
        return out.to(x.dtype).reshape(batch, length, self.out_features)

    def extra_repr(self) -> str:
        act = self.activation
        return (
            f"in={self.in_features}, out={self.out_features}, w{self.weight_grid.bits}"
            f"{'' if self.group_size is None else f'g{self.group_size}'}"
            f"{'i' if self.integer_group_factors() is not None else ''}a{act.bits if act.mode != 'none' else 16} "
            f"({act.mode}), backend={self.backend}"
        )

