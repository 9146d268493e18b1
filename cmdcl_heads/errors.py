"""The error of a training that cannot go on: options this data cannot train with, a run folder in the way,
non-finite steps or a collapse. Its own module because the set-up, the loop and its end all raise it."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite gradients, run folder in the way, ...)."""
