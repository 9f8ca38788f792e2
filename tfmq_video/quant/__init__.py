"""Quantization: the shared affine math, quantizers and fake-quant modules."""
