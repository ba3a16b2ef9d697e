"""Stages: one module each, entry function `run(source, cfg, ctx) -> Artifact`."""
