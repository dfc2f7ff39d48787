"""The Hugging Face converters' error: a checkpoint or HF folder that cannot be converted, and why."""
from __future__ import annotations

from typing import List


class HFConversionError(ValueError):
    """A checkpoint or HF folder that cannot be converted, saying what is unsupported and what is."""


def require(ok: bool, family: str, what: str) -> None:
    """Raise a clear error naming the family when the HF class cannot represent a setting."""
    if not ok:
        raise HFConversionError(f"cannot export a {family!r} model to Hugging Face: {what}")


def list_keys(keys: List[str], n: int = 8) -> str:
    """The first `n` keys, and how many more, for an error message."""
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more

