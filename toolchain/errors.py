"""Errors the CLI turns into exit codes; a light module so `compress` can catch them without
importing the stages that raise them.

Exit codes: 2 bad input (`toolchain.config.ConfigError`, `ModelError`), 1 a gate failed (`GateError`),
3 training diverged (`TrainingDivergedError`).
"""


class ModelError(ValueError):
    """The model folder cannot be used; the message says what to pass instead."""


class TrainingDivergedError(RuntimeError):
    """A loss became NaN/inf or exceeded `max_loss`; the last good checkpoint is kept."""


class GateError(RuntimeError):
    """A measured gate failed (export parity, regression); the CLI exits with code 1."""
