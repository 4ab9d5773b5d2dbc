"""Defaults that the command line shows before torch is imported."""

DEFAULT_RATIO = 2.0  # per-layer weight compression ratio when none is asked for
