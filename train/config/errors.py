"""`ConfigError`: an impossible or unsupported configuration, raised by the schema's own `validate()` methods
(train/config/model.py, run.py), by `train.trainer.validate.validate_config` and by the model constructors that
reuse those methods. The message is one line naming the field(s), the value and the fix."""
from __future__ import annotations


class ConfigError(ValueError):
    """An impossible or unsupported configuration; the message says which field and what to do."""


def check(ok: bool, msg: str) -> None:
    """Raise `ConfigError(msg)` unless `ok`."""
    if not ok:
        raise ConfigError(msg)


def one_of(field: str, value, choices) -> None:
    """`value` must be a member (or the value of a member) of the enum `choices`: the schema already refuses other
    values at composition; this catches configs built by hand."""
    allowed = tuple(c.value for c in choices)
    check(value in allowed, f"{field}={value!r} is not valid: choose one of {', '.join(allowed)}")
