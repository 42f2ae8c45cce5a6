"""distill pipeline core: config, DAG, runner, storage and CLI.

This package knows stages only through their declared interface
(`pipeline.core.stage.Stage`): inputs, outputs, params model and fingerprint.
"""
