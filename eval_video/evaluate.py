"""One evaluation run: which videos, which metrics, with which networks -> an :class:`EvalReport`.

:class:`EvalConfig` says *what* to evaluate; :func:`evaluate` runs it and :func:`write_reports`
writes the JSON and the readable report. ``tfmq-video eval`` and the demo both go through here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eval_video.backbones import FeatureCache, VideoBackbone, make_backbone
from eval_video.fidelity import ClipScorer, clip_metrics, fidelity, latent_fidelity, read_latents
from eval_video.frame_models import FLOW_METRICS, FarnebackFlow, FlowEstimator, make_flow, opencv_missing
from eval_video.fvd import fvd, fvd_fp
from eval_video.io import Video, list_videos, load_video, load_videos, write_comparison_strip
from eval_video.report import EvalReport, write_json, write_readable
from eval_video.results import MetricResult, MissingWeightsError, skipped
from eval_video.vbench_metrics import (
    DIMENSIONS,
    VBenchModels,
    load_vbench_models,
    quality_score,
    vbench_dimension,
)
from tfmq_video.errors import ConfigError

logger = logging.getLogger(__name__)

FIDELITY_METRICS: tuple[str, ...] = ("psnr", "ssim", "rel_l2_pixels", "cosine_pixels", "delta_flow")
LATENT_METRICS: tuple[str, ...] = ("rel_l2_latents", "cosine_latents")
CLIP_METRICS: tuple[str, ...] = ("clip_temp", "clipsim")
GROUPS: dict[str, tuple[str, ...]] = {
    "fidelity": FIDELITY_METRICS,
    "vbench": (*DIMENSIONS, "vbench_quality"),
    "clip": CLIP_METRICS,
    "latents": LATENT_METRICS,
}
METRICS: tuple[str, ...] = ("fvd", "fvd_fp", *FIDELITY_METRICS, *LATENT_METRICS, *DIMENSIONS, "vbench_quality",
                            *CLIP_METRICS, "vbench_package")
DEFAULT_METRICS: tuple[str, ...] = ("fvd", "fvd_fp", "fidelity", "vbench")


def expand_metrics(requested: Sequence[str]) -> list[str]:
    """Metric and group names (comma- or space-separated) -> metric names, in order, no repeats."""
    names: list[str] = []
    for item in (part.strip() for entry in requested for part in entry.split(",")):
        if not item:
            continue
        if item not in GROUPS and item not in METRICS:
            raise ConfigError(f"unknown metric {item!r}; expected one of {', '.join(METRICS)} "
                              f"or a group ({', '.join(GROUPS)})")
        names += [m for m in GROUPS.get(item, (item,)) if m not in names]
    if not names:
        raise ConfigError("no metrics requested")
    return names


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate. Paths are folders of videos (files or sub-folders of frames)."""

    videos: list[Path]
    labels: list[str] | None = None
    reference: Path | None = None
    fp: Path | None = None
    metrics: list[str] = field(default_factory=lambda: expand_metrics(DEFAULT_METRICS))
    fvd_backbone: str | None = None  # "i3d" or "toy": always the user's explicit choice
    i3d_weights: Path | None = None
    i3d_bn_eps: float = 1e-3
    feature_cache: Path | None = None
    pad_short: bool = False
    raft_weights: Path | None = None
    dino: Path | None = None
    clip_b32: Path | None = None
    clip_l14: Path | None = None
    aesthetic_head: Path | None = None
    frame_proxy: str | None = None  # "toy": proxy encoder where no weights are given
    latents: list[Path] | None = None
    fp_latents: Path | None = None
    prompts: Path | None = None
    fps: float | None = None
    strips: int = 4
    batch_size: int = 8
    device: str = "cpu"
    progress: bool = True

    def method_labels(self) -> list[str]:
        """One label per videos folder (default: the folder names)."""
        labels = self.labels or [Path(p).name for p in self.videos]
        if len(labels) != len(self.videos):
            raise ConfigError(f"got {len(labels)} labels for {len(self.videos)} video folders")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"labels must be distinct, got {labels}; pass --labels")
        if self.latents is not None and len(self.latents) != len(self.videos):
            raise ConfigError(f"got {len(self.latents)} --latents folders for {len(self.videos)} --videos folders")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {self.batch_size}")
        return labels


@dataclass
class _Networks:
    """What is loaded once and shared by every method."""

    backbone: VideoBackbone | None
    flow: FlowEstimator | None
    vbench: VBenchModels | None
    clip: ClipScorer | None
    clip_missing: str | None
    captions: dict[str, str] | None


def _needs_fvd(config: EvalConfig) -> bool:
    return any(m in config.metrics for m in ("fvd", "fvd_fp"))


def _load_networks(config: EvalConfig) -> _Networks:
    backbone = None
    if _needs_fvd(config) and (config.reference is not None or config.fp is not None):
        if config.fvd_backbone is None:
            raise ConfigError("FVD needs an explicit backbone: --fvd-backbone i3d --i3d-weights FILE, or "
                              "--fvd-backbone toy (the toy classifier, a proxy for the toy world)")
        backbone = make_backbone(config.fvd_backbone, config.i3d_weights, config.i3d_bn_eps, config.device)
    wants_flow = any(m in config.metrics for m in FLOW_METRICS)
    if (reason := opencv_missing(config.metrics, raft=config.raft_weights is not None)) is not None:
        raise ConfigError(reason)
    flow = make_flow(config.raft_weights) if wants_flow else None
    vbench = None
    if any(m in config.metrics for m in DIMENSIONS):
        vbench = load_vbench_models(flow or FarnebackFlow(), config.dino, config.clip_b32, config.clip_l14,
                                    config.aesthetic_head, config.frame_proxy)
    clip, clip_missing = None, None
    if any(m in config.metrics for m in CLIP_METRICS):
        try:
            clip = ClipScorer(config.clip_b32)
        except MissingWeightsError as err:
            clip_missing = str(err)
    return _Networks(backbone, flow, vbench, clip, clip_missing, _read_prompts(config.prompts))


def _read_prompts(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        prompts = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable JSON file of {{video name: caption}} ({err})") from err
    if not isinstance(prompts, dict) or not all(isinstance(v, str) for v in prompts.values()):
        raise ConfigError(f"{path}: expected a JSON object mapping video names to captions")
    return prompts


def _fvd_results(config: EvalConfig, nets: _Networks, paths: list[Path], cache: FeatureCache | None) -> list[MetricResult]:
    results = []
    if "fvd" in config.metrics:
        if config.reference is None or nets.backbone is None:
            results.append(skipped("fvd", "FVD needs reference videos: pass --reference DIR", higher_is_better=False))
        else:
            results.append(fvd(paths, list_videos(config.reference), nets.backbone, cache, config.pad_short,
                               config.progress, config.batch_size))
    if "fvd_fp" in config.metrics:
        if config.fp is None or nets.backbone is None:
            results.append(skipped("fvd_fp", "FVD-FP needs the FP videos from the same seeds: pass --fp DIR",
                                   higher_is_better=False))
        else:
            results.append(fvd_fp(paths, list_videos(config.fp), nets.backbone, cache, config.pad_short,
                                  config.progress, config.batch_size))
    return results


def _fidelity_results(config: EvalConfig, nets: _Networks, videos: list[Video],
                      fp_videos: list[Video] | None) -> list[MetricResult]:
    wanted = [m for m in FIDELITY_METRICS if m in config.metrics]
    if not wanted:
        return []
    if fp_videos is None:
        return [skipped(m, f"{m} compares against FP videos: pass --fp DIR") for m in wanted]
    return fidelity(videos, fp_videos, nets.flow, wanted)


def _latent_results(config: EvalConfig, index: int) -> list[MetricResult]:
    wanted = [m for m in LATENT_METRICS if m in config.metrics]
    if not wanted:
        return []
    if not config.latents or config.fp_latents is None:
        return [skipped(m, f"{m} needs --latents DIR (one per --videos) and --fp-latents DIR of "
                           "<name>.safetensors latents") for m in wanted]
    results = latent_fidelity(read_latents(config.latents[index]), read_latents(config.fp_latents))
    return [r for r in results if r.metric in wanted]


def _vbench_results(config: EvalConfig, nets: _Networks, videos: list[Video]) -> list[MetricResult]:
    results = [vbench_dimension(m, videos, nets.vbench, config.progress)  # type: ignore[arg-type]
               for m in DIMENSIONS if m in config.metrics]
    if "vbench_quality" in config.metrics:
        results.append(quality_score(results))
    return results


def _clip_results(config: EvalConfig, nets: _Networks, videos: list[Video]) -> list[MetricResult]:
    wanted = [m for m in CLIP_METRICS if m in config.metrics]
    if not wanted:
        return []
    if nets.clip is None:
        return [skipped(m, nets.clip_missing or "needs --clip-b32 FOLDER") for m in wanted]
    return [r for r in clip_metrics(videos, nets.clip, nets.captions) if r.metric in wanted]


def _package_results(config: EvalConfig, folder: Path, label: str, out_dir: Path) -> list[MetricResult]:
    if "vbench_package" not in config.metrics:
        return []
    from eval_video.vbench_metrics import run_vbench_package

    return run_vbench_package(folder, out_dir / f"vbench_{label}", DIMENSIONS, config.device)


def _needs_frames(config: EvalConfig) -> bool:
    return any(m in config.metrics for m in (*FIDELITY_METRICS, *DIMENSIONS, *CLIP_METRICS))


def _write_strips(config: EvalConfig, label: str, paths: list[Path], out_dir: Path) -> list[Path]:
    """FP | quantized | difference strips of the first ``config.strips`` videos that have an FP partner."""
    if config.fp is None or config.strips <= 0:
        return []
    fp_by_name = {p.stem: p for p in list_videos(config.fp)}
    pairs = [(p, fp_by_name[p.stem]) for p in paths if p.stem in fp_by_name][: config.strips]
    return [write_comparison_strip(out_dir / "strips" / label / f"{path.stem}.png",
                                   load_video(fp, config.fps).frames, load_video(path, config.fps).frames,
                                   labels=("FP", label)) for path, fp in pairs]


def evaluate(config: EvalConfig, assets_dir: Path) -> EvalReport:
    """Run every requested metric on every videos folder; strips go under ``assets_dir``."""
    labels = config.method_labels()
    nets = _load_networks(config)
    cache = FeatureCache(config.feature_cache) if config.feature_cache is not None else None
    wants_fp_frames = config.fp is not None and any(m in config.metrics for m in FIDELITY_METRICS)
    fp_videos = load_videos(config.fp, config.fps, progress=config.progress) if wants_fp_frames else None
    report = EvalReport(_inputs(config, labels), _settings(config, nets), {})
    for index, (label, folder) in enumerate(zip(labels, config.videos, strict=True)):
        logger.info("evaluating %s (%s)", label, folder)
        paths = list_videos(folder)
        videos = load_videos(paths, config.fps, progress=config.progress) if _needs_frames(config) else []
        results = _fvd_results(config, nets, paths, cache)
        results += _fidelity_results(config, nets, videos, fp_videos)
        results += _latent_results(config, index)
        results += _vbench_results(config, nets, videos)
        results += _clip_results(config, nets, videos)
        results += _package_results(config, Path(folder), label, assets_dir)
        report.methods[label] = results
        report.strips[label] = _write_strips(config, label, paths, assets_dir)
    return report


def _inputs(config: EvalConfig, labels: list[str]) -> dict[str, object]:
    return {"videos": {label: str(p) for label, p in zip(labels, config.videos, strict=True)},
            "reference": str(config.reference) if config.reference else None,
            "fp": str(config.fp) if config.fp else None}


def _settings(config: EvalConfig, nets: _Networks) -> dict[str, object]:
    keep = ("metrics", "fvd_backbone", "i3d_bn_eps", "pad_short", "frame_proxy", "fps")
    settings = {k: v for k, v in asdict(config).items() if k in keep}
    settings["fvd_backbone_description"] = nets.backbone.describe() if nets.backbone else None
    settings["flow"] = nets.flow.name if nets.flow else None
    return settings


def write_reports(report: EvalReport, json_path: Path, readable_path: Path | None, assets_dir: Path) -> list[Path]:
    """Write the JSON report and (when asked) the markdown/HTML one with its plots."""
    written = [write_json(json_path, report)]
    if readable_path is not None:
        written.append(write_readable(readable_path, report, assets_dir))
    return written
