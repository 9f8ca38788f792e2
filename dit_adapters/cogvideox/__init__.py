"""CogVideoX (diffusers' ``CogVideoXTransformer3DModel``): its adapter and quantizable attention processor."""

from dit_adapters.cogvideox.adapter import CogVideoXAdapter, CogVideoXJointAttention

__all__ = ["CogVideoXAdapter", "CogVideoXJointAttention"]
