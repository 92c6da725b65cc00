"""Stages of a pipeline: one module per kind, each `run(stage_cfg, ctx) -> final eval metrics`."""
