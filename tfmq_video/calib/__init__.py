"""TFMQ calibration: one-pass recording, the temporal information block (TIAR, FSC, cache,
selection), block reconstruction, baselines and the public :func:`quantize`."""
