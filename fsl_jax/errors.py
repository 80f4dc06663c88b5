"""Errors raised on bad input. Each names the input that caused it."""

import math


class FslJaxError(Exception):
    """Base class for every error this library raises on bad input."""


class ConfigError(FslJaxError, KeyError):
    """An unknown method, option or config key, or a value of the wrong kind."""

    def __str__(self):  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(FslJaxError, ValueError):
    """Missing, corrupt or too small data: the message names the file or the request."""


class TrainingDiverged(FslJaxError, FloatingPointError):
    """The loss, or the parameters (``loss`` None), became NaN or infinite; the last good checkpoint is kept."""

    def __init__(self, step: int, loss: float | None, checkpoint_step: int | None):
        self.step, self.loss, self.checkpoint_step = step, loss, checkpoint_step
        kept = (f"the last good checkpoint (step {checkpoint_step}) is kept"
                if checkpoint_step is not None else "no checkpoint had been written yet")
        what = f"loss is {loss} at step {step}" if loss is not None else f"the parameters are not finite after step {step}"
        super().__init__(f"{what}: training stopped; {kept}")


class Preempted(FslJaxError):
    """Training had notice of preemption (SIGTERM, as cluster schedulers send before they evict a job):
    it wrote a checkpoint of the step it had reached and stopped; the same command resumes from it."""

    def __init__(self, step: int):
        self.step = step
        super().__init__(f"preempted (SIGTERM) at step {step}: its checkpoint is written, and the same command "
                         "resumes the run from it")


class ExportError(FslJaxError, ValueError):
    """A model that cannot be exported as asked (an unsupported operation, an output that exists)."""


def _finite_number(value) -> bool:
    """Whether ``value`` is a finite int or float (a bool is no number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive(name: str, value) -> None:
    """A ConfigError naming ``name`` unless ``value`` is a finite number above zero (a learning rate, say)."""
    if not (_finite_number(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def check_probability(name: str, value) -> None:
    """A ConfigError naming ``name`` unless ``value`` is a number strictly between 0 and 1 (a threshold, say)."""
    if not (_finite_number(value) and 0 < value < 1):
        raise ConfigError(f"{name} must be a probability between 0 and 1 (exclusive), got {value!r}")


def check_weight(name: str, value) -> None:
    """A ConfigError naming ``name`` unless ``value`` is a finite number of at least zero (a loss term's weight:
    zero turns the term off, a negative one would maximise it)."""
    if not (_finite_number(value) and value >= 0):
        raise ConfigError(f"{name} must be a number of at least 0, got {value!r}")


def check_count(name: str, value, least: int = 1) -> None:
    """A ConfigError naming ``name`` unless ``value`` is an integer of at least ``least`` (a number of steps, say)."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= least):
        wanted = {0: "a non-negative integer", 1: "a positive integer"}.get(least, f"an integer of at least {least}")
        raise ConfigError(f"{name} must be {wanted}, got {value!r}")
