"""Python source text that already lives on the machine, split into train and held-out files.

The demo pair trains on the standard library. A file is held out when a hash of its path
relative to the stdlib root falls in a fixed bucket, so the split is the same on every machine
with the same Python, and the training manifest written next to the weights records exactly
which files were trained on.
"""

from __future__ import annotations

import hashlib
import os
import site
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_BUCKETS = 10  # one file in ten is held out


@dataclass(frozen=True)
class SourceFile:
    """One readable UTF-8 Python file: its path relative to `root` and its text."""

    root: Path
    relpath: str
    text: str


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relpath: str) -> bool:
    """True for the stable tenth of files that training never sees."""
    digest = hashlib.sha1(relpath.encode()).digest()
    return digest[0] % HELD_OUT_BUCKETS == 0


def iter_python_files(root: Path, skip_dirs: tuple[str, ...] = ("site-packages", "__pycache__")):
    """Yield every `.py` file under `root` that decodes as UTF-8, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # not UTF-8 (a few test fixtures) or unreadable
            if text.strip():
                yield SourceFile(root, str(path.relative_to(root)), text)


def stdlib_split() -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, held_out) files of the standard library."""
    train, held = [], []
    for f in iter_python_files(stdlib_root()):
        (held if is_held_out(f.relpath) else train).append(f)
    return train, held


def third_party_files(limit: int | None = None) -> list[SourceFile]:
    """Python sources of installed third-party packages: code the demo models never saw."""
    files: list[SourceFile] = []
    for sp in site.getsitepackages():
        for f in iter_python_files(Path(sp), skip_dirs=("__pycache__", "tests", "test")):
            files.append(f)
            if limit is not None and len(files) >= limit:
                return files
    return files
