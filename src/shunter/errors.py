"""The exceptions a user can cause; the command line prints each as a single line."""

from __future__ import annotations


class ShunterError(Exception):
    """Bad input from the user: a file, a field, or a value. The message names all three."""


class FieldError(ShunterError):
    """A bad value of a named field (a library parameter such as `hosts` or `dtype`).

    The library names the field, not a command-line flag; the command line shows the flag that set
    it (`--hosts`) when the command has one. `value`, when given, is shown after the field name."""

    def __init__(self, field: str, message: str, value: str | None = None) -> None:
        self.field, self.message, self.value = field, message, value
        super().__init__(self.render(field))

    def render(self, name: str) -> str:
        """The message with the field shown as `name` (e.g. the flag that set it)."""
        return f"{name} {self.value}: {self.message}" if self.value is not None else f"{name}: {self.message}"
