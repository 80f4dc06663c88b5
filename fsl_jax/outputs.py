"""Writing outputs that may replace earlier ones without ever losing or mixing them."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, TypeVar

from fsl_jax.errors import ConfigError

T = TypeVar("T")


def remove(path: Path) -> None:
    """Remove a file, link or directory tree, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_replacing(path: Path, write: Callable[[Path], T]) -> T:
    """``write(partial)`` into ``.partial-<name>`` beside ``path``, then move it to ``path``.

    What ``path`` held is replaced only once ``write`` has returned, so a failure leaves it as
    it was and old and new files are never mixed; the partial output never outlives the call.
    A file replaces a file in one step (``os.replace``), so even a kill leaves the old or the new
    one; a directory's old tree is removed first. Returns what ``write`` returns.
    """
    path = Path(path).resolve()  # resolved, so the partial of "." or ".." lies beside it, not inside it
    if Path.cwd().resolve().is_relative_to(path):
        raise ConfigError(f"output {path} holds the current directory; choose another")
    partial = path.with_name(f".partial-{path.name}")
    remove(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = write(partial)
        if partial.is_dir() or path.is_dir():
            remove(path)
        os.replace(partial, path)
        return result
    finally:
        remove(partial)
