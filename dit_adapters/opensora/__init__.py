"""Open-Sora 1.2: our STDiT3 port, its checkpoint loading and its rectified-flow sampler."""

from dit_adapters.opensora.loading import load_stdit3, save_stdit3
from dit_adapters.opensora.rflow import RFlowSampler, SamplerConfig, StepState
from dit_adapters.opensora.stdit3 import STDiT3, STDiT3Config

__all__ = ["STDiT3", "STDiT3Config", "load_stdit3", "save_stdit3", "RFlowSampler", "SamplerConfig", "StepState"]
