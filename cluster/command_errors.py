"""How the ``editrl`` subcommands built here report a bad input: one line on stderr in the
style of :mod:`editrl.cli`, ``editrl: error: <message>``, and exit code 1."""
from __future__ import annotations

import sys


def error(message: str) -> int:
    """Write ``editrl: error: <message>`` to stderr; returns 1 (the command's exit code)."""
    sys.stderr.write(f"editrl: error: {message}\n")
    return 1


def one_line(exc: BaseException) -> str:
    """An error as one line; a config's pydantic ValidationError as ``field: message`` pairs."""
    import pydantic

    if isinstance(exc, pydantic.ValidationError):
        parts = [f"{'.'.join(str(p) for p in e['loc']) or exc.title}: {e['msg']}" for e in exc.errors()]
        return f"invalid config: {'; '.join(parts)}"
    return " ".join(str(exc).split()) or type(exc).__name__
