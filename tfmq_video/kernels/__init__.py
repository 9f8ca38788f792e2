"""Triton kernels for the GPU runtime, each beside a pure-PyTorch reference of the same function.

- :mod:`~tfmq_video.kernels.w8a8_gemm`: int8 x int8 -> int32 GEMM, fused dequantization and bias.
- :mod:`~tfmq_video.kernels.w4a8_gemm`: packed int4 weights unpacked in the main loop.
- :mod:`~tfmq_video.kernels.act_quant`: per-token quantization, LayerNorm + modulate + quantize.
- :mod:`~tfmq_video.kernels.int8_attention`: SageAttention-style INT8 attention.

Without triton the references still import; the Triton launchers are then absent
(:data:`HAS_TRITON` is False).
"""

from tfmq_video.kernels._triton import HAS_TRITON, TRITON_IMPORT_ERROR, interpreting

__all__ = ["HAS_TRITON", "TRITON_IMPORT_ERROR", "interpreting"]
