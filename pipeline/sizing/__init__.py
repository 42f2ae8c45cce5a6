"""Sizing before a run: hub model configs, GPU fit, and the cost estimate (GPUs in data/gpus.yaml)."""
