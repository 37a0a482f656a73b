"""`Secret`: a credential (an API key or secret, the control API's token) that never shows itself.

Its own module, importing nothing, so that the settings, the service, the control API and the chaos
harness can hold credentials without importing the ccxt adapter (and ccxt with it)."""
from __future__ import annotations


class Secret:
    """A credential that never shows itself in repr, str, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)
