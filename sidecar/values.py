"""Parsers for configuration values, shared by sidecar.config and the settings of other parts (storage.remote):
each takes what the environment or config.yaml gave and returns the typed value, or raises ValueError with
the end of a sentence ("must be true or false") that config puts after the key's name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Parser = Callable[[Any], Any]


def text(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value).strip() == "":
        raise ValueError("must be a non-empty string")
    return str(value).strip()


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word in ("true", "1", "yes", "on"):
        return True
    if word in ("false", "0", "no", "off"):
        return False
    raise ValueError("must be true or false")


def int_at_least(minimum: int, maximum: int | None = None) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool):
            raise ValueError("must be an integer")
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ValueError("must be an integer") from None
        if number < minimum or (maximum is not None and number > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
            raise ValueError(f"must be {bound}")
        return number

    return parse
