"""The :class:`~dit_adapters.base.DiTAdapter` of diffusers' ``CogVideoXTransformer3DModel`` (CogVideoX 2B/5B).

TIB: ``time_proj`` + ``time_embedding`` -> ``emb``, then every block's adaLN linears
(``norm1.linear``, ``norm2.linear``: shift, scale and gate of the video and text streams) and the
output norm's (``norm_out.linear``). Unlike STDiT3, whose blocks share one modulation (``t_mlp``),
each CogVideoX block computes its own from ``emb``: the temporal features are those linears'
outputs, ``block{i}_norm1``, ``block{i}_norm2`` and ``norm_out`` (S, 6D or 2D), served one module
at a time (:func:`~dit_adapters.base.serve_module_outputs`). ``emb`` itself reaches nothing
outside the TIB. These linears hold a sizable share of the weights (two (6D x D) matrices per
block), which is why keeping the TIB in FP is not free here.

Blocks: ``transformer_blocks.{i}``; each updates the text and video tokens, carried as one token
stream (text first, as the joint attention sees them). Attention sites: ``transformer_blocks.{i}.attn1``,
made wrappable by :meth:`CogVideoXAdapter.prepare` (a processor computing what diffusers' CogVideoX
processor computes, with the ``softmax(q k^T) v`` step as an ``attention(q, k, v)`` method).
``proj_out`` (the last linear) stays FP: no block feeds its reconstruction.

Not supported: the ``ofs`` embedding of CogVideoX 1.5 image-to-video, and ``timestep_cond``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dit_adapters.base import BlockBatch, DiTAdapter, TemporalFeatures, TemporalOverride, serve_module_outputs
from tfmq_video.errors import CheckpointError, ConfigError

CALL_ARGUMENTS = ("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs", "image_rotary_emb")


def _argument(args: tuple, kwargs: Mapping[str, Any], name: str) -> Any:
    position = CALL_ARGUMENTS.index(name)
    return args[position] if len(args) > position else kwargs.get(name)


def _transformer_class() -> type[nn.Module]:
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v``: the step a quantized model replaces by its quantized matmuls."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class CogVideoXJointAttention:
    """Attention processor of CogVideoX blocks equal to diffusers' ``CogVideoXAttnProcessor2_0``
    except that the matmuls run through ``attn.attention(q, k, v)``, where quantizers can wrap them."""

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(video tokens, text tokens) after joint self-attention over text + video."""
        from diffusers.models.embeddings import apply_rotary_emb

        if attention_mask is not None:
            raise ConfigError("CogVideoX attention with a mask is not supported by the quantizable processor")
        text_length = encoder_hidden_states.shape[1]
        tokens = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, length, _ = tokens.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, length, attn.heads, -1).transpose(1, 2)

        q, k, v = heads(attn.to_q(tokens)), heads(attn.to_k(tokens)), heads(attn.to_v(tokens))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:  # rotary positions on the video tokens only
            q = torch.cat([q[:, :, :text_length], apply_rotary_emb(q[:, :, text_length:], image_rotary_emb)], dim=2)
            if not attn.is_cross_attention:
                k = torch.cat([k[:, :, :text_length], apply_rotary_emb(k[:, :, text_length:], image_rotary_emb)],
                              dim=2)
        out = attn.attention(q, k, v).transpose(1, 2).reshape(batch, length, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text_length:], out[:, :text_length]


class CogVideoXAdapter(DiTAdapter):
    """Adapter of diffusers' ``CogVideoXTransformer3DModel`` (see module docstring)."""

    name = "cogvideox"
    temporal_modules = ("time_proj", "time_embedding", "transformer_blocks.*.norm1.linear",
                        "transformer_blocks.*.norm2.linear", "norm_out.linear")
    keep_fp_patterns = ("proj_out",)

    # ---------------------------------------------------------------- model I/O
    def build_model(self, config: Mapping[str, Any]) -> nn.Module:
        """A CogVideoX transformer with random weights from its diffusers config dict."""
        model = _transformer_class().from_config(dict(config))
        self._check_supported(model)
        return model.eval()

    def load_model(self, path: str) -> nn.Module:
        """The transformer of a diffusers folder: the pipeline folder (``transformer/`` inside) or the
        transformer's own folder; safetensors weights only. ``toy``: the bundled toy CogVideoX."""
        if path == "toy":
            from tfmq_video.toy.cogvideox_world import TOY_COGVIDEOX_DIR

            path = str(TOY_COGVIDEOX_DIR)
        folder = Path(path)
        if (folder / "transformer" / "config.json").is_file():
            folder = folder / "transformer"
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{path} holds no diffusers config.json (nor transformer/config.json): give the "
                                  "CogVideoX pipeline folder or its transformer folder")
        try:
            model = _transformer_class().from_pretrained(str(folder), use_safetensors=True)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot load a CogVideoX transformer from {folder}: {err}") from err
        self._check_supported(model)
        return model.eval()

    def model_config(self, model: nn.Module) -> dict[str, Any]:
        """The diffusers config (JSON types; private keys such as ``_diffusers_version`` left out)."""
        return {key: (list(value) if isinstance(value, tuple) else value)
                for key, value in dict(model.config).items() if not key.startswith("_")}

    def prepare(self, model: nn.Module) -> None:
        """Give every block's attention the quantizable processor and an ``attention`` method."""
        self._check_supported(model)
        for name in self.attention_sites(model):
            site = model.get_submodule(name)
            site.set_processor(CogVideoXJointAttention())
            if not callable(getattr(site, "attention", None)):
                object.__setattr__(site, "attention", scaled_dot_product)

    @staticmethod
    def _check_supported(model: nn.Module) -> None:
        if getattr(model, "ofs_embedding", None) is not None:
            raise ConfigError("CogVideoX models with an ofs embedding (CogVideoX 1.5 image-to-video) are not "
                              "supported yet: their temporal features depend on ofs as well as the timestep")

    # ---------------------------------------------------------------- temporal information block
    def timestep_of(self, args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
        """``timestep`` (B,)."""
        return torch.as_tensor(_argument(args, kwargs, "timestep")).reshape(-1)

    def temporal_conditions(self, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """None: the TIB sees the timestep only (``ofs`` and ``timestep_cond`` are refused)."""
        for name in ("ofs", "timestep_cond"):
            if _argument(args, kwargs, name) is not None:
                raise ConfigError(f"CogVideoX calls with {name} are not supported by the cogvideox adapter")
        return {}

    @staticmethod
    def feature_modules(model: nn.Module) -> dict[str, str]:
        """Temporal feature name -> the module whose output it is."""
        modules = {}
        for i in range(len(model.transformer_blocks)):
            modules[f"block{i}_norm1"] = f"transformer_blocks.{i}.norm1.linear"
            modules[f"block{i}_norm2"] = f"transformer_blocks.{i}.norm2.linear"
        modules["norm_out"] = "norm_out.linear"
        return modules

    @staticmethod
    def time_embedding(model: nn.Module, timestep: torch.Tensor) -> torch.Tensor:
        """``emb`` (B, time_embed_dim) of ``timestep`` (B,), as the model's forward computes it."""
        dtype = next(model.time_embedding.parameters()).dtype
        return model.time_embedding(model.time_proj(timestep).to(dtype), None)

    def temporal_features(
        self, model: nn.Module, timestep: torch.Tensor, conditions: Mapping[str, torch.Tensor]
    ) -> TemporalFeatures:
        """Every adaLN linear's output on ``silu(emb)``: ``{block{i}_norm1, block{i}_norm2, norm_out}``."""
        activated = F.silu(self.time_embedding(model, timestep))
        return {feature: model.get_submodule(module)(activated)
                for feature, module in self.feature_modules(model).items()}

    def override_temporal_features(self, model: nn.Module, override: TemporalOverride | None) -> None:
        """Shadow each adaLN linear's forward by a call of ``override`` for its feature."""
        serve_module_outputs(model, self.feature_modules(model), override)

    # ---------------------------------------------------------------- blocks
    def block_names(self, model: nn.Module) -> list[str]:
        """``transformer_blocks.0, transformer_blocks.1, ...``."""
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def attention_sites(self, model: nn.Module) -> list[str]:
        """Every block's joint self-attention."""
        return [f"{block}.attn1" for block in self.block_names(model)]

    def embed(self, model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> BlockBatch:
        """Text + video tokens (one stream, text first), ``temb`` per row; the text length and
        rotary tables are shared by the rows."""
        self.temporal_conditions(args, kwargs)  # refuses ofs and timestep_cond, which embed would ignore
        hidden = _argument(args, kwargs, "hidden_states")
        text = _argument(args, kwargs, "encoder_hidden_states")
        timestep = self.timestep_of(args, kwargs).to(hidden.device)
        emb = self.time_embedding(model, timestep.expand(hidden.shape[0]))
        tokens = model.embedding_dropout(model.patch_embed(text, hidden))
        static = {"text_length": text.shape[1], "image_rotary_emb": _argument(args, kwargs, "image_rotary_emb")}
        return BlockBatch(tokens, {"temb": emb}, static)

    def prediction_tokens(self, batch: BlockBatch) -> slice:
        """The video tokens, after the text (the prediction is made from them alone)."""
        return slice(batch.static["text_length"], None)

    def run_block(self, block: nn.Module, batch: BlockBatch) -> torch.Tensor:
        """The block's text + video tokens (one stream)."""
        text_length = batch.static["text_length"]
        rotary = batch.static["image_rotary_emb"]
        if rotary is not None:
            rotary = tuple(table.to(batch.hidden.device) for table in rotary)
        video, text = block(batch.hidden[:, text_length:], batch.hidden[:, :text_length], batch.rows["temb"],
                            image_rotary_emb=rotary)
        return torch.cat([text, video], dim=1)
