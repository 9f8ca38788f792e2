"""Speed benchmarks: ``tfmq-video bench kernels`` and ``tfmq-video bench model``."""
