"""The one exception type a user can cause; the command line prints it as a single line."""

from __future__ import annotations


class ShunterError(Exception):
    """Bad input from the user: a file, a field, or a value. The message names all three."""
