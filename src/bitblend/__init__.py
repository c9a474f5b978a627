"""bitblend: mixed (multi-task, multi-model) and low-precision training of transformers."""

__version__ = "0.1.0"
