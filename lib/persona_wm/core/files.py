"""Repository paths and atomic file writes: the one place that knows where the checkout is.

Every layer may write a file (a dataset, an adapter's metadata, ``metrics.json``), so the atomic
write sits at the bottom of the package; readers see the old file or the complete new one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = ["REPO_ROOT", "PACKAGE_ROOT", "atomic_write", "atomic_write_text"]

#: lib/persona_wm/core/files.py -> the checkout (the folder holding lib/, params/, outputs/).
REPO_ROOT: Path = Path(__file__).resolve().parents[3]
#: lib/persona_wm: package data (tolerances.yaml) lives beside the code.
PACKAGE_ROOT: Path = Path(__file__).resolve().parents[1]


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through a temp file in the same directory, then ``os.replace`` it into place.

    Same directory so the rename never crosses filesystems (where it would stop being atomic);
    readers see either the old file or the complete new one, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically; returns the path."""
    data = text.encode("utf-8")
    return atomic_write(Path(path), lambda handle: handle.write(data))
