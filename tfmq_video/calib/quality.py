"""The quality table on the toy world: FP, every baseline and TFMQ variant at several bit widths.

Every method is calibrated on the same recorded calibration set (one FP sampling pass) and
generates the same (caption, seed) pairs as FP. Metrics, in the toy classifier's feature space
(the role I3D plays for real videos; covariance N-1, float64, see :mod:`eval_video.frechet`):

- ``fvd``: against real toy clips; ``fvd_fp``: against the FP videos of the same seeds;
- ``psnr_fp``: mean PSNR (dB) of the uint8 videos against FP;
- ``temporal_feature_error``: mean relative squared error of the temporal features over steps;
- ``fp-reseed``: FP with other seeds, the noise floor of ``fvd_fp``; with ``fp_reseeds`` K > 1
  there are K such rows (key ``reseed``: 1..K), and :func:`fp_noise_floor` gives the spread of
  ``fvd`` over the K + 1 FP seed sets: how far an FP model's own ``fvd`` moves with the seeds.

With several calibration seeds (``QualityPlan.calib_seeds``: the recipe's ``seed``, which draws
the reconstruction rows and minibatches), every method is calibrated once per seed, rows carry
``calib_seed``, and :func:`seed_summary` gives the mean and spread per (method, setting): the
calibration noise that a difference between methods must exceed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from eval_video._files import atomic_path
from eval_video.fidelity import psnr
from eval_video.frechet import frechet_distance_features
from tfmq_video.calib.api import quantize
from tfmq_video.calib.baselines import METHODS, method_recipe
from tfmq_video.calib.recorder import CalibrationSet
from tfmq_video.devices import model_device
from tfmq_video.quant.config import RecipeConfig
from tfmq_video.toy.families import ToyFamily, toy_family

DEFAULT_SETTINGS: tuple[tuple[int, int], ...] = ((8, 8), (4, 8), (4, 6))
ROW_KEYS = ("method", "wbits", "abits", "fvd", "fvd_fp", "psnr_fp", "temporal_feature_error", "calib_seconds",
            "quantized_weight_fraction")
RESEED_OFFSET = 500_000

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityPlan:
    """What the table covers: methods, (wbits, abits) settings, number of videos, seed, base recipe."""

    methods: tuple[str, ...] = tuple(METHODS)
    settings: tuple[tuple[int, int], ...] = DEFAULT_SETTINGS
    num_videos: int = 32
    seed: int = 0
    base: RecipeConfig = field(default_factory=RecipeConfig)
    calib_seeds: tuple[int, ...] | None = None  # None: the base recipe's seed only
    model_path: str | None = None  # a model folder of ``family``; None: the bundled toy model
    fp_cache: str | None = None  # a folder keeping the FP videos between runs; None: regenerate
    fp_reseeds: int = 1  # FP runs with other seeds (rows ``fp-reseed``): the noise floor
    device: str = "cpu"  # where the models sample and calibrate; scoring runs on CPU
    family: str = "stdit3"  # which toy model family (tfmq_video.toy.families)


class ToyEvaluator:
    """Generates the evaluation videos of a model of ``family`` (default: the toy STDiT3) and
    scores them against FP and real clips."""

    def __init__(self, num_videos: int, seed: int, family: ToyFamily | None = None) -> None:
        from tfmq_video.toy.data import all_captions, clips_to_tensor, make_clips
        from tfmq_video.toy.world import load_toy_classifier

        self.family = family or toy_family("stdit3")
        captions = [c.text for c in all_captions()]
        self.captions = [captions[(seed + i * 7) % len(captions)] for i in range(num_videos)]
        self.seeds = [seed * 1000 + i for i in range(num_videos)]
        self.classifier = load_toy_classifier()
        real, _ = make_clips(seed + 1, num_videos)
        self.real_features = self.features(clips_to_tensor(real))

    def generate(self, model: torch.nn.Module, reseed: int = 0) -> torch.Tensor:
        """Latents (N, 3, T, H, W) for the evaluation captions (the ``reseed``-th other seed set when > 0)."""
        return self.family.generate(model, self.captions, self.seeds_for(reseed))

    def seeds_for(self, reseed: int) -> list[int]:
        """The evaluation seeds (``reseed`` 0), or the ``reseed``-th set of other seeds."""
        if reseed < 0:
            raise ValueError(f"reseed must be >= 0, got {reseed}")
        return [s + int(reseed) * RESEED_OFFSET for s in self.seeds]

    def generate_fp(self, model: torch.nn.Module, reseed: int, cache: str | None) -> torch.Tensor:
        """:meth:`generate` for the FP model, read from / written to the folder ``cache`` when given.

        The file name is a hash of the model's weights, the captions, the seeds and the sampler
        settings, so a changed model or plan never reads stale videos.
        """
        if cache is None:
            return self.generate(model, reseed)
        path = Path(cache) / f"fp_{self.cache_key(model, reseed)}.safetensors"
        if path.is_file():
            log.info("FP videos from %s", path)
            return load_file(str(path))["latents"]
        latents = self.generate(model, reseed)
        with atomic_path(path) as tmp:
            save_file({"latents": latents.contiguous()}, str(tmp))
        log.info("FP videos saved to %s", path)
        return latents

    def cache_key(self, model: torch.nn.Module, reseed: int) -> str:
        """Hex digest naming the FP videos of ``model`` for this evaluator (and the device type they
        are sampled on: other devices round differently)."""
        from tfmq_video.calib.checkpoint import model_fingerprint
        from tfmq_video.toy.world import VIDEO_SHAPE

        plan = json.dumps({"model": model_fingerprint(model), "captions": self.captions,
                           "seeds": self.seeds_for(reseed), "sampler": self.family.sampler,
                           "shape": VIDEO_SHAPE, "device": model_device(model).type})
        return hashlib.sha256(plan.encode()).hexdigest()[:24]

    @torch.no_grad()
    def features(self, videos: torch.Tensor) -> np.ndarray:
        """Toy classifier features (N, D) of videos in [-1, 1]."""
        return self.classifier.features(videos.clamp(-1, 1)).double().numpy()

    @torch.no_grad()
    def labels(self, features: np.ndarray) -> np.ndarray:
        """(N, 3) class indices (one column per classifier head: shape, color, direction) of videos
        with :meth:`features` ``features``."""
        head_dtype = next(self.classifier.heads.parameters()).dtype
        f = torch.from_numpy(features).to(head_dtype)
        return np.stack([head(f).argmax(-1).numpy() for head in self.classifier.heads.values()], axis=1)

    def score(self, latents: torch.Tensor, fp_latents: torch.Tensor, fp_features: np.ndarray) -> dict[str, float]:
        """fvd, fvd_fp and psnr_fp of ``latents``, plus three diagnostics of ``fvd_fp``: its mean
        term ``fvd_fp_mean_term``, the paired ``feature_error_fp`` (:func:`paired_feature_error`) and
        ``label_flips_fp``, the share of videos whose shape, color or direction the classifier reads
        otherwise than in the FP video of the same caption and seed (a discrete change, where the
        other two measure how far features move), with its split by head and the flipped videos'
        share of the mean term (:meth:`flip_scores`)."""
        from tfmq_video.toy.data import tensor_to_clips

        feats = self.features(latents)
        clips, fp_clips = tensor_to_clips(latents), tensor_to_clips(fp_latents)
        psnrs = [psnr(a, b) for a, b in zip(clips, fp_clips, strict=True)]
        finite = [p for p in psnrs if math.isfinite(p)]
        return {
            "fvd": frechet_distance_features(feats, self.real_features),
            "fvd_fp": frechet_distance_features(feats, fp_features),
            "psnr_fp": float(np.mean(finite)) if finite else None,  # type: ignore[dict-item]
            "fvd_fp_mean_term": float(np.sum((feats.mean(0) - fp_features.mean(0)) ** 2)),
            "feature_error_fp": paired_feature_error(feats, fp_features),
            **self.flip_scores(feats, fp_features),
        }

    def flip_scores(self, feats: np.ndarray, fp_features: np.ndarray) -> dict[str, float]:
        """``label_flips_fp`` (share of videos read otherwise than their FP twin by any head),
        ``label_flips_fp_{head}`` per classifier head, and ``mean_term_share_flipped``: the share of
        the mean term of ``fvd_fp`` that the flipped videos carry (:func:`mean_shift_share`)."""
        from tfmq_video.toy.classifier import HEADS

        differs = self.labels(feats) != self.labels(fp_features)
        flipped = np.any(differs, axis=1)
        scores = {"label_flips_fp": float(np.mean(flipped))}
        scores.update({f"label_flips_fp_{head}": float(np.mean(differs[:, i])) for i, head in enumerate(HEADS)})
        scores["mean_term_share_flipped"] = mean_shift_share(feats, fp_features, flipped)
        return scores


def mean_term_parts(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each video's share of ``fvd_fp``'s mean term (they sum to 1; all 0 when there is no shift).

    Features and reference are paired (same caption and seed), so the mean shift
    ``d = mean(features) - mean(reference)`` is the mean of the per-video differences, and the
    mean term ``|d|^2`` splits exactly into per-video parts ``<delta_i, d> / N``; a part can be
    negative (a video that moved against the common shift)."""
    deltas = features - reference
    shift = deltas.mean(0)
    total = float(np.sum(shift**2))
    if total <= 0.0:
        return np.zeros(len(deltas))
    return deltas @ shift / len(deltas) / total


def mean_shift_share(features: np.ndarray, reference: np.ndarray, members: np.ndarray) -> float:
    """Share of ``fvd_fp``'s mean term carried by the videos ``members`` (boolean mask over rows):
    1 when they carry all of it, 0 when none (:func:`mean_term_parts`)."""
    return float(mean_term_parts(features, reference)[members].sum())


def paired_feature_error(features: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared distance between paired feature vectors (same caption and seed), relative to
    the reference's variance: 0 for identical videos, about 2 for independent samples of the same
    distribution. Unlike a Fréchet distance at N <= D it has no covariance to estimate."""
    spread = float(np.mean(np.sum((reference - reference.mean(0)) ** 2, axis=1)))
    return float(np.mean(np.sum((features - reference) ** 2, axis=1))) / max(spread, 1e-12)


def _row(method: str, wbits: int, abits: int, scores: dict[str, Any], **extra: Any) -> dict[str, Any]:
    row = {"method": method, "wbits": wbits, "abits": abits, **scores,
           "temporal_feature_error": 0.0, "calib_seconds": 0.0, "quantized_weight_fraction": 0.0}
    row.update(extra)
    return row


def quality_table(plan: QualityPlan, progress: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of the quality table and per-step temporal-feature errors per (method, setting)."""
    family = toy_family(plan.family)
    model = family.load(plan.model_path).to(plan.device)
    evaluator = ToyEvaluator(plan.num_videos, plan.seed, family)
    fp = evaluator.generate_fp(model, 0, plan.fp_cache)
    fp_features = evaluator.features(fp)
    if plan.fp_reseeds < 1:
        raise ValueError(f"fp_reseeds must be >= 1, got {plan.fp_reseeds}")
    rows = [_row("fp", 32, 32, evaluator.score(fp, fp, fp_features), psnr_fp=None)]
    for reseed in range(1, plan.fp_reseeds + 1):
        reseeded = evaluator.generate_fp(model, reseed, plan.fp_cache)
        rows.append(_row("fp-reseed", 32, 32, evaluator.score(reseeded, fp, fp_features), reseed=reseed))
    cal = plan.base.calibration
    start = time.perf_counter()
    calibration: CalibrationSet = family.record(model, cal.num_prompts, cal.seed, cal.steps, cal.batch_size, progress)
    record_seconds = time.perf_counter() - start
    curves: dict[str, Any] = {"timesteps": calibration.timesteps}
    seeds = plan.calib_seeds or (plan.base.seed,)
    for wbits, abits in plan.settings:
        for method in plan.methods:
            for calib_seed in seeds:
                recipe = method_recipe(method, wbits, abits, plan.base.model_copy(update={"seed": calib_seed}))
                qmodel = quantize(model, family.adapter, calibration, recipe)
                latents = evaluator.generate(qmodel)
                temporal = qmodel.report["temporal"]
                rows.append(_row(
                    method, wbits, abits, evaluator.score(latents, fp, fp_features),
                    temporal_feature_error=temporal["temporal_feature_error"],
                    calib_seconds=qmodel.report["seconds"]["total"] + record_seconds,
                    quantized_weight_fraction=qmodel.quantized_weight_fraction(), calib_seed=calib_seed,
                    block_output_errors=block_output_errors(qmodel.report),
                    weight_group_size=recipe.quant.weight.group_size,
                    integer_group_scales=recipe.quant.weight.integer_group_scales,
                ))
                suffix = f" seed {calib_seed}" if len(seeds) > 1 else ""
                curves[f"{method}{suffix} W{wbits}A{abits}"] = per_step_error(temporal["final"])
                errors = list(rows[-1]["block_output_errors"].values())
                log.info("%s", {**{k: rows[-1][k] for k in ROW_KEYS}, "calib_seed": calib_seed,
                                "final_output_error": errors[-1] if errors else None})
    for row in rows:
        row["num_videos"] = plan.num_videos
        row["device"] = model_device(model).type
        row["family"] = family.name
    return rows, curves


def fp_noise_floor(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The FP rows' spread: ``fvd`` mean and standard deviation over FP and its re-seeded runs
    (one FP model, several seed sets), and ``fvd_fp`` / ``psnr_fp`` over the re-seeded runs."""
    fp = [row for row in rows if row["method"] in ("fp", "fp-reseed")]
    reseeded = [row for row in fp if row["method"] == "fp-reseed"]

    def spread(values: list[float]) -> tuple[float, float]:
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    floor: dict[str, Any] = {"seed_sets": len(fp)}
    floor["fvd"], floor["fvd_std"] = spread([row["fvd"] for row in fp])
    floor["fvd_fp"], floor["fvd_fp_std"] = spread([row["fvd_fp"] for row in reseeded])
    floor["psnr_fp"], floor["psnr_fp_std"] = spread([row["psnr_fp"] for row in reseeded])
    return floor


def block_output_errors(report: dict[str, Any]) -> dict[str, float]:
    """Relative output error of every reconstructed unit (blocks, then the head) on the
    calibration rows, from a :func:`~tfmq_video.calib.api.quantize` report; empty without
    reconstruction."""
    blocks = report.get("reconstruction", {}).get("blocks", {})
    return {name: entry["output_error"] for name, entry in blocks.items()}


def seed_summary(rows: Sequence[dict[str, Any]], keys: Sequence[str] = ("fvd", "fvd_fp", "psnr_fp")
                 ) -> list[dict[str, Any]]:
    """Per (method, wbits, abits) over calibration seeds: ``seeds`` and each key's mean and
    standard deviation (``{key}_std``, 0 for one seed)."""
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for row in rows:
        if "calib_seed" in row:
            groups.setdefault((row["method"], row["wbits"], row["abits"]), []).append(row)
    summary = []
    for (method, wbits, abits), members in groups.items():
        entry: dict[str, Any] = {"method": method, "wbits": wbits, "abits": abits, "seeds": len(members)}
        for key in keys:
            values = [m[key] for m in members if m.get(key) is not None]
            entry[key] = float(np.mean(values)) if values else None
            entry[f"{key}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def summary_table(summary: Sequence[dict[str, Any]], keys: Sequence[str] = ("fvd", "fvd_fp", "psnr_fp")) -> str:
    """:func:`seed_summary` as markdown: ``mean ± std`` per key."""
    lines = ["| method | wbits | abits | seeds | " + " | ".join(keys) + " |", "|" + "---|" * (4 + len(keys))]
    for entry in summary:
        cells = [f"{entry[k]:.4g} ± {entry[f'{k}_std']:.2g}" if entry[k] is not None else "-" for k in keys]
        lines.append(f"| {entry['method']} | {entry['wbits']} | {entry['abits']} | {entry['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_step_error(errors: dict[str, Sequence[float]]) -> list[float]:
    """Mean over temporal features of the per-step errors."""
    return np.mean(np.array([list(v) for v in errors.values()]), axis=0).tolist()


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a markdown table (columns :data:`ROW_KEYS`)."""

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(ROW_KEYS) + " |", "|" + "---|" * len(ROW_KEYS)]
    lines += ["| " + " | ".join(cell(row.get(k)) for k in ROW_KEYS) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(curves: dict[str, Any], path: str) -> None:
    """Temporal-feature error per timestep, one line per method and setting (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timesteps = curves["timesteps"]
    labels = [label for label in curves if label != "timesteps"]
    methods = sorted({label.split()[0] for label in labels})
    settings = sorted({label.split()[-1] for label in labels})
    colors = plt.get_cmap("tab10")
    styles = ("-", "--", ":", "-.")
    fig, ax = plt.subplots(figsize=(8, 5))
    exact = []
    for label in labels:
        values = curves[label]
        if max(values) == 0.0:  # TIB kept FP: nothing to draw on a log scale
            exact.append(label)
            continue
        method, setting = label.split()[0], label.split()[-1]
        ax.plot(timesteps, values, marker="o", markersize=3, label=label,
                color=colors(methods.index(method) % 10), linestyle=styles[settings.index(setting) % len(styles)])
    if exact:
        ax.set_title("zero error (TIB kept FP): " + ", ".join(exact), fontsize=8)
    ax.set_xlabel("timestep")
    ax.set_ylabel("temporal feature error (relative, feature mean)")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
