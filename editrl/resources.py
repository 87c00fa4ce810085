"""Where relative paths of a config point: the user's files first, then the presets
and assets that ship with editrl.

A preset names files relative to a project directory (``configs/reward_server.yaml``,
``assets/clips/prompts_train.parquet``, ``assets/warm_checkpoint``). They resolve
against the current directory when they exist there (a checkout, or the user's
own project), else against the files bundled with editrl: the package data of an
installed wheel (``editrl/configs``, ``editrl/assets``) or the checkout's own
``configs/`` and ``assets/``. Nothing here imports more than the standard library.
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def checkout_root() -> Path | None:
    """The repository root when editrl runs from a source checkout, else None (a wheel)."""
    root = PACKAGE_DIR.parent
    return root if (root / "pyproject.toml").is_file() and (root / "cluster" / "__init__.py").is_file() else None


def bundled_root() -> Path:
    """The directory holding the bundled ``configs/`` and ``assets/``: the checkout's
    root, or the installed ``editrl`` package."""
    return checkout_root() or PACKAGE_DIR


def resolve_path(path: str | Path, base: str | Path | None = None) -> Path:
    """An absolute path for a path named in a config or on the command line.

    Absolute paths are returned as given. A relative one is looked up in ``base``
    (default: the current directory), then in :func:`bundled_root`; when it exists
    in neither, the ``base`` path is returned so that the caller's error names it.
    """
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    local = Path(base or Path.cwd()) / path
    if local.exists():
        return local.resolve()
    bundled = bundled_root() / path
    return bundled if bundled.exists() else local.absolute()
