"""Evaluation of generated videos: I/O, FVD (I3D or the toy proxy), VBench-style metrics, fidelity vs FP.

Entry points: ``tfmq-video eval`` (:mod:`eval_video.command`) and :func:`eval_video.evaluate.evaluate`.
Heavy modules (torch models, OpenCV, matplotlib) are imported by the submodules that need them.
"""

from eval_video.frechet import frechet_distance, frechet_distance_features
from eval_video.io import Video, VideoError, load_video, read_video, write_video
from eval_video.results import MetricResult

__all__ = ["MetricResult", "Video", "VideoError", "frechet_distance", "frechet_distance_features", "load_video",
           "read_video", "write_video"]
