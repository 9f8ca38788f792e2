"""The quantized checkpoint folder: real integer tensors, a JSON manifest, safetensors only.

Folder layout (format version 1)::

    manifest.json                 format version, model family and config, bit widths, per-layer
                                  scheme, full-precision tensor names, SHA-256 and size per file
    quantized.safetensors         per quantized layer ``<name>.<tensor>``:
                                    weight_packed (uint8, W4: see tfmq_video.export.packing) or
                                    weight_codes (int8, 5-8 bits; uint8 for unsigned 8-bit codes),
                                    weight_scale / weight_zero_point
                                    (float32, (out, 1) per channel or (out, in / group) per group),
                                    bias (float32), act_scale / act_zero_point (float32: () static,
                                    (num_steps,) per timestep; absent for dynamic per-token)
    full_precision.safetensors    every other tensor of the model (kept in full precision)
    temporal_cache.safetensors    optional: timesteps, t (T, C), t_mlp (T, 6C) at one fps

A quantized patchify conv (stride == kernel size, no padding, dilation 1, one group) is stored as
the Linear over its flattened patches: codes (out, in * prod(kernel)) in ``weight.reshape(out, -1)``
order, its layer entry adding ``conv`` (the original weight shape and kernel size); see
tfmq_video.runtime.conv. Other convolutions are refused at export (keep them in full precision).

Loading checks the version, every hash and every name and shape before building anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tfmq_video.checkpoint import atomic_folder
from tfmq_video.errors import CheckpointError, ConfigError
from tfmq_video.export.packing import packed_columns, unpack_int4
from tfmq_video.quant.affine import code_dtype
from tfmq_video.quant.records import ActivationRecord, QuantizedLinearRecord
from tfmq_video.runtime.conv import CONV_TYPES, QuantPatchConv, patchify_problem
from tfmq_video.runtime.convert import TemporalFeatureCache, build_runtime_model
from tfmq_video.runtime.linear import QuantLinear

FORMAT_NAME = "tfmq-video-quantized"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
QUANTIZED_FILE = "quantized.safetensors"
FP_FILE = "full_precision.safetensors"
CACHE_FILE = "temporal_cache.safetensors"
INT4_LAYOUT = "uint8 (out, ceil(in/2)); byte j = element 2j (low nibble) | element 2j+1 (high nibble) << 4"


# --------------------------------------------------------------------------- model families


def _build_stdit3(config: dict) -> nn.Module:
    from dit_adapters.opensora.stdit3 import STDiT3, STDiT3Config

    try:
        cfg = STDiT3Config.from_dict(config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"manifest model_config is not a valid STDiT3 config: {err}") from err
    with torch.device("meta"):
        model = STDiT3(cfg)
    model = model.to_empty(device="cpu")
    model.pos_embed.inv_freq = model.pos_embed.inverse_frequencies(cfg.hidden_size)
    return model


# family name -> (builder from config dict on CPU with uninitialized weights, config of a model)
FAMILIES: dict[str, tuple[Callable[[dict], nn.Module], Callable[[nn.Module], dict]]] = {
    "stdit3": (_build_stdit3, lambda model: model.config.to_dict()),
}


def family_of(model: nn.Module) -> str:
    """The registered family name of ``model``."""
    name = type(model).__name__.lower()
    if name not in FAMILIES:
        raise ConfigError(f"export supports model families {sorted(FAMILIES)}, got {type(model).__name__}")
    return name


# --------------------------------------------------------------------------- helpers


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _weight_storage(layer: QuantLinear) -> str:
    if layer.weight_grid.bits == 4:
        return "int4_packed"
    return "uint8" if code_dtype(layer.weight_grid) == torch.uint8 else "int8"


def _layer_entry(layer: QuantLinear) -> dict:
    act = layer.activation
    entry = {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "weight_bits": layer.weight_grid.bits,
        "weight_signed": layer.weight_grid.signed,
        "group_size": layer.group_size,
        "weight_storage": _weight_storage(layer),
        "has_bias": layer.bias is not None,
        "activation": {
            "mode": act.mode, "bits": act.bits, "signed": act.signed,
            "num_steps": None if layer.act_scale is None or layer.act_scale.dim() == 0 else int(layer.act_scale.shape[0]),
        },
    }
    if isinstance(layer, QuantPatchConv):  # absent for Linear layers
        entry["conv"] = {"weight_shape": list(layer.original_shape), "kernel_size": list(layer.kernel_size)}
    return entry


def _conv_problems(model: nn.Module, records: Sequence[QuantizedLinearRecord]) -> list[str]:
    """Why conv records cannot be exported (non-patchify geometry, shape mismatch), one line each."""
    problems = []
    for record in records:
        if record.original_shape is None:
            continue
        try:
            module = model.get_submodule(record.name)
        except AttributeError:
            problems.append(f"{record.name}: no such module in the model")
            continue
        weight = getattr(module, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(record.original_shape):
            problems.append(
                f"{record.name}: record of a conv weight {tuple(record.original_shape)}, but the model's module is "
                f"{type(module).__name__} {None if weight is None else tuple(weight.shape)}"
            )
        elif (problem := patchify_problem(module)) is not None:
            problems.append(f"{record.name}: {problem}")
    return problems


def bf16_bytes(layer: QuantLinear) -> int:
    """Bytes the same layer takes as a bf16 Linear (weight and bias)."""
    return 2 * layer.out_features * (layer.in_features + (1 if layer.bias is not None else 0))


# --------------------------------------------------------------------------- save


def save_quantized(
    folder: str | os.PathLike,
    model: nn.Module,
    records: Sequence[QuantizedLinearRecord],
    calibrated_timesteps: Sequence[float] | None = None,
    temporal_cache: TemporalFeatureCache | None = None,
) -> Path:
    """Export ``records`` (quantized layers) plus the rest of the full-precision ``model`` atomically."""
    family = family_of(model)
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ConfigError("records name some layers more than once")
    conv_problems = _conv_problems(model, records)
    if conv_problems:
        raise ConfigError(
            f"format v{FORMAT_VERSION} exports quantized convs only as patchify convs (stride == kernel size, "
            "no padding, dilation 1, groups 1); these cannot be exported:\n  " + "\n  ".join(conv_problems)
            + "\nkeep them in full precision: add their names to the recipe's quant.keep_fp patterns "
            "(or leave them out of the RTN include patterns) and quantize again"
        )
    layers = {
        r.name: (QuantLinear if r.original_shape is None else QuantPatchConv)(r, backend="reference") for r in records
    }
    quantized = {f"{name}.{key}": t for name, layer in layers.items() for key, t in layer.state_dict().items()}
    skip = {f"{name}.{p}" for name in names for p in ("weight", "bias")}
    fp_state = {k: v for k, v in model.state_dict().items() if k not in skip}
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "family": family,
        "model_config": FAMILIES[family][1](model),
        "int4_layout": INT4_LAYOUT,
        "weight_bits": sorted({r.weight_bits for r in records}),
        "activation_bits": sorted({r.activation.bits for r in records if r.activation.mode != "none"}),
        "calibrated_timesteps": None if calibrated_timesteps is None else [float(t) for t in calibrated_timesteps],
        "layers": {name: _layer_entry(layer) for name, layer in layers.items()},
        "full_precision": sorted(fp_state),
        "temporal_cache": None if temporal_cache is None else {"fps": temporal_cache.fps, "num_steps": len(temporal_cache.timesteps)},
        "summary": {
            "quantized_weight_bytes": sum(layer.weight_bytes() for layer in layers.values()),
            "quantized_layers_bf16_bytes": sum(bf16_bytes(layer) for layer in layers.values()),
        },
    }

    def write(tmp: Path) -> None:
        files = {QUANTIZED_FILE: quantized, FP_FILE: fp_state}
        if temporal_cache is not None:
            files[CACHE_FILE] = temporal_cache.tensors()
        manifest["files"] = {}
        for file_name, tensors in files.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / file_name))
            manifest["files"][file_name] = {"sha256": sha256_file(tmp / file_name), "bytes": (tmp / file_name).stat().st_size}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")

    return atomic_folder(Path(folder), write)


# --------------------------------------------------------------------------- load


def read_manifest(folder: str | os.PathLike) -> dict:
    """Parse and version-check ``manifest.json``; verify every listed file's SHA-256."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {folder} is not a tfmq-video quantized checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a {FORMAT_NAME} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {manifest.get('format_version')!r}, but this tfmq-video reads version "
            f"{FORMAT_VERSION}; re-export the checkpoint with this version"
        )
    for key in ("family", "model_config", "layers", "full_precision", "files"):
        if key not in manifest:
            raise CheckpointError(f"{path} lacks the {key!r} entry")
    for file_name in (QUANTIZED_FILE, FP_FILE):
        if file_name not in manifest["files"]:
            raise CheckpointError(f"{path} does not list {file_name}")
    for file_name, entry in manifest["files"].items():
        file_path = folder / file_name
        if not file_path.is_file():
            raise CheckpointError(f"{file_path} is listed in the manifest but missing")
        actual = sha256_file(file_path)
        if actual != entry.get("sha256"):
            raise CheckpointError(
                f"{file_path}: SHA-256 {actual[:16]}... does not match the manifest's {str(entry.get('sha256'))[:16]}...; "
                "the file is corrupt or was changed after export"
            )
    return manifest


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from err


def _expected_layer_tensors(entry: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out_f, in_f = entry["out_features"], entry["in_features"]
    groups = 1 if entry["group_size"] is None else in_f // entry["group_size"]
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
        "weight_scale": ((out_f, groups), torch.float32),
        "weight_zero_point": ((out_f, groups), torch.float32),
    }
    if entry["weight_storage"] == "int4_packed":
        expected["weight_packed"] = ((out_f, packed_columns(in_f)), torch.uint8)
    else:
        expected["weight_codes"] = ((out_f, in_f), torch.uint8 if entry["weight_storage"] == "uint8" else torch.int8)
    if entry["has_bias"]:
        expected["bias"] = ((out_f,), torch.float32)
    act = entry["activation"]
    if act["mode"] in ("static", "per_timestep"):
        shape = () if act["mode"] == "static" else (act["num_steps"],)
        expected["act_scale"] = (shape, torch.float32)
        expected["act_zero_point"] = (shape, torch.float32)
    return expected


def _layer_fit_problems(name: str, entry: dict, module: nn.Module) -> list[str]:
    """Whether a manifest layer entry fits the built model's module (Linear, or patchify conv)."""
    conv = entry.get("conv")
    if conv is None:
        if not isinstance(module, nn.Linear) or (module.out_features, module.in_features) != (
            entry["out_features"], entry["in_features"]
        ):
            return [f"layer {name}: manifest {entry['out_features']}x{entry['in_features']} does not fit {module}"]
        return []
    shape = tuple(conv.get("weight_shape") or ())
    if not isinstance(module, CONV_TYPES) or tuple(module.weight.shape) != shape:
        return [f"layer {name}: manifest conv weight {shape} does not fit {module}"]
    if (entry["out_features"], entry["in_features"]) != (shape[0], math.prod(shape[1:])):
        return [f"layer {name}: manifest {entry['out_features']}x{entry['in_features']} is not conv {shape} flattened"]
    problem = patchify_problem(module)
    return [] if problem is None else [f"layer {name}: not a patchify conv ({problem})"]


def _check_tensors(manifest: dict, quantized: dict, fp_state: dict, model: nn.Module, source: Path) -> None:
    """One error listing every missing, unexpected or mis-shaped tensor."""
    problems = []
    expected_q = {}
    for name, entry in manifest["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"layer {name}: not in the model")
            continue
        problems += _layer_fit_problems(name, entry, module)
        if entry.get("weight_storage") not in ("int4_packed", "int8", "uint8"):
            problems.append(f"layer {name}: unknown weight storage {entry.get('weight_storage')!r}")
            continue
        expected_q.update({f"{name}.{k}": v for k, v in _expected_layer_tensors(entry).items()})
    for key, (shape, dtype) in expected_q.items():
        tensor = quantized.get(key)
        if tensor is None:
            problems.append(f"{QUANTIZED_FILE}: missing {key}")
        elif tuple(tensor.shape) != shape or tensor.dtype != dtype:
            problems.append(f"{QUANTIZED_FILE}: {key} is {tensor.dtype} {tuple(tensor.shape)}, expected {dtype} {shape}")
    problems += [f"{QUANTIZED_FILE}: unexpected {key}" for key in sorted(set(quantized) - set(expected_q))]
    skip = {f"{name}.{p}" for name in manifest["layers"] for p in ("weight", "bias")}
    expected_fp = {k: v.shape for k, v in model.state_dict().items() if k not in skip}
    problems += [f"{FP_FILE}: missing {k}" for k in sorted(set(expected_fp) - set(fp_state))]
    problems += [f"{FP_FILE}: unexpected {k}" for k in sorted(set(fp_state) - set(expected_fp))]
    problems += [
        f"{FP_FILE}: {k} is {tuple(fp_state[k].shape)}, model expects {tuple(shape)}"
        for k, shape in expected_fp.items() if k in fp_state and fp_state[k].shape != shape
    ]
    if problems:
        raise CheckpointError(
            f"{source} does not fit its manifest's {manifest['family']} model ({len(problems)} problems):\n  "
            + "\n  ".join(problems[:30])
        )


def _record(name: str, entry: dict, tensors: dict[str, torch.Tensor]) -> QuantizedLinearRecord:
    t = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
    if entry["weight_storage"] == "int4_packed":
        codes = unpack_int4(t["weight_packed"], entry["in_features"], entry["weight_signed"])
    else:
        codes = t["weight_codes"]
    act = entry["activation"]
    return QuantizedLinearRecord(
        name=name, weight_codes=codes, weight_scale=t["weight_scale"], weight_zero_point=t["weight_zero_point"],
        weight_bits=entry["weight_bits"], weight_signed=entry["weight_signed"], group_size=entry["group_size"],
        bias=t.get("bias"),
        activation=ActivationRecord(act["mode"], act["bits"], act["signed"], t.get("act_scale"), t.get("act_zero_point")),
        original_shape=None if entry.get("conv") is None else tuple(entry["conv"]["weight_shape"]),
    )


def _temporal_cache(manifest: dict, folder: Path) -> TemporalFeatureCache | None:
    if manifest.get("temporal_cache") is None:
        return None
    tensors = _load_tensors(folder / CACHE_FILE)
    missing = {"timesteps", "t", "t_mlp"} - set(tensors)
    if missing:
        raise CheckpointError(f"{folder / CACHE_FILE} lacks {sorted(missing)}")
    return TemporalFeatureCache(tensors["timesteps"], float(manifest["temporal_cache"]["fps"]), tensors["t"], tensors["t_mlp"])


def load_quantized(
    folder: str | os.PathLike, backend: str = "auto", attention: str = "auto", dtype: torch.dtype = torch.float32,
    compile: bool | None = None, device: torch.device | str | None = None,
) -> nn.Module:
    """Rebuild a runnable quantized model from an exported folder (eval mode), on ``device``
    (default: the CPU; ``"cuda"`` for the ``triton`` backend).

    ``dtype`` is the dtype of the full-precision parts and of activations (bf16 is fastest on
    CPUs with bf16 units); quantized layers keep their integer weights and float32 scales.
    ``compile``: see :func:`~tfmq_video.runtime.convert.build_runtime_model`. Nothing is
    returned unless every check passes.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    family = manifest["family"]
    if family not in FAMILIES:
        raise CheckpointError(f"{folder}: unknown model family {family!r}; this tfmq-video knows {sorted(FAMILIES)}")
    quantized = _load_tensors(folder / QUANTIZED_FILE)
    fp_state = _load_tensors(folder / FP_FILE)
    cache = _temporal_cache(manifest, folder)
    model = FAMILIES[family][0](manifest["model_config"])
    _check_tensors(manifest, quantized, fp_state, model, folder)
    model.load_state_dict(fp_state, strict=False)
    model = model.to(dtype).eval()
    records = [_record(name, entry, quantized) for name, entry in manifest["layers"].items()]
    return build_runtime_model(
        model, records, backend=backend, attention=attention,
        calibrated_timesteps=manifest.get("calibrated_timesteps"), temporal_cache=cache, compile=compile,
        device=device,
    )


def weight_bytes_report(model: nn.Module, folder: str | os.PathLike | None = None) -> dict[str, float]:
    """In-memory (and, given the folder, on-disk) bytes of the quantized layers against bf16."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    memory = sum(layer.weight_bytes() for layer in layers)
    reference = sum(bf16_bytes(layer) for layer in layers)
    report = {
        "quantized_layers": len(layers),
        "quantized_weight_bytes_in_memory": memory,
        "quantized_layers_bf16_bytes": reference,
        "memory_ratio_vs_bf16": reference / memory if memory else float("nan"),
        "backend_cache_bytes": sum(layer.backend_cache_bytes() for layer in layers),
    }
    if folder is not None:
        disk = Path(folder) / QUANTIZED_FILE
        report["quantized_file_bytes"] = disk.stat().st_size
        report["disk_ratio_vs_bf16"] = reference / disk.stat().st_size
    return report
