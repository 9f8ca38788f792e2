"""tfmq-video: post-training quantization of video diffusion transformers (TFMQ)."""

__version__ = "0.1.0"
