"""FVD against reference videos, and FVD-FP (quantized against FP videos from the same seeds).

Both encode one clip per video with the chosen backbone (see :mod:`eval_video.backbones`), fit
a Gaussian to each feature set and return the Fréchet distance (:mod:`eval_video.frechet`).
The result states N, the backbone, whether it is a proxy and the covariance convention; it
warns when N is small against the feature dimension (FVD is biased upward there).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

from eval_video.backbones import EncodedSet, FeatureCache, VideoBackbone, encode_paths, encode_videos
from eval_video.frechet import COVARIANCE_NOTE, SmallSampleWarning, feature_stats, frechet_distance_stats
from eval_video.io import Video, VideoError
from eval_video.results import MetricResult

VideoSet = Sequence[Path] | Sequence[Video]


def _encode(backbone: VideoBackbone, videos: VideoSet, cache: FeatureCache | None, pad_short: bool,
            progress: bool, desc: str, batch_size: int) -> EncodedSet:
    if len(videos) == 0:
        raise VideoError(f"{desc}: no videos")
    if isinstance(videos[0], Video):
        return encode_videos(backbone, videos, pad_short, batch_size, progress, desc)  # type: ignore[arg-type]
    return encode_paths(backbone, videos, cache, pad_short, batch_size, progress, desc)  # type: ignore[arg-type]


def fvd_from_features(metric: str, generated: EncodedSet, reference: EncodedSet, backbone: VideoBackbone,
                      reference_label: str = "reference") -> MetricResult:
    """The Fréchet distance between two encoded sets, with N, backbone and conventions recorded."""
    notes = [COVARIANCE_NOTE, f"one clip per video: the first {backbone.num_frames} frames",
             f"N = {len(generated.names)} generated clips vs {len(reference.names)} {reference_label} clips"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SmallSampleWarning)
        stats_gen, stats_ref = feature_stats(generated.features), feature_stats(reference.features)
    for message in dict.fromkeys(str(w.message) for w in caught):  # once per distinct message
        warnings.warn(message, SmallSampleWarning, stacklevel=3)  # re-raised for the caller
        notes.append(f"warning: {message}")
    for label, encoded in (("generated", generated), ("reference", reference)):
        if encoded.padded:
            notes.append(f"{encoded.padded} {label} videos were shorter than {backbone.num_frames} frames "
                         "and padded by repeating their last frame")
    value = frechet_distance_stats(stats_gen, stats_ref)
    return MetricResult(metric, value, len(generated.names), backbone.describe(), backbone.proxy,
                        higher_is_better=False, notes=notes)


def fvd(videos: VideoSet, reference: VideoSet, backbone: VideoBackbone, cache: FeatureCache | None = None,
        pad_short: bool = False, progress: bool = False, batch_size: int = 8) -> MetricResult:
    """FVD of ``videos`` (files or decoded videos) against ``reference`` videos."""
    generated = _encode(backbone, videos, cache, pad_short, progress, "generated videos", batch_size)
    ref = _encode(backbone, reference, cache, pad_short, progress, "reference videos", batch_size)
    return fvd_from_features("fvd", generated, ref, backbone)


def _names(videos: VideoSet) -> list[str]:
    return [v.name if isinstance(v, Video) else Path(v).stem for v in videos]


def check_same_seeds(videos: VideoSet, fp_videos: VideoSet) -> None:
    """FVD-FP and fidelity need one FP video per video, with the same file names (same seeds)."""
    if len(videos) != len(fp_videos):
        raise VideoError(f"got {len(videos)} videos but {len(fp_videos)} FP videos: FVD-FP compares outputs "
                         "from the same seeds, one FP video per video with the same file name")
    names, fp_names = _names(videos), _names(fp_videos)
    if "<array>" not in names and sorted(names) != sorted(fp_names):
        only = sorted(set(names) ^ set(fp_names))
        raise VideoError(f"videos and FP videos must share file names (same seeds); unmatched: {', '.join(only[:10])}")


def fvd_fp(videos: VideoSet, fp_videos: VideoSet, backbone: VideoBackbone, cache: FeatureCache | None = None,
           pad_short: bool = False, progress: bool = False, batch_size: int = 8) -> MetricResult:
    """FVD-FP: FVD of quantized outputs against the FP outputs from the same seeds."""
    check_same_seeds(videos, fp_videos)
    generated = _encode(backbone, videos, cache, pad_short, progress, "quantized videos", batch_size)
    fp = _encode(backbone, fp_videos, cache, pad_short, progress, "FP videos", batch_size)
    return fvd_from_features("fvd_fp", generated, fp, backbone, "FP")
