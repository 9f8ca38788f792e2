"""Subcommands of the ``tfmq-video`` command line (see :mod:`tfmq_video.cli`)."""
