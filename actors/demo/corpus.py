"""Python source text that already lives on the machine, split into train and held-out files.

The demo pair trains on the standard library (corpus `stdlib`), or on it and the installed
third-party packages' sources (corpus `code`). A file is held out when a hash of its path
relative to its root (prefixed with SITE_PREFIX for third-party files) falls in a fixed bucket,
so the split is the same on every machine with the same packages, and the training manifest
written next to the weights records exactly which files were trained on. Code the benchmarks
call unseen (`third_party_files`) leaves out every file that manifest names.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import site
import sysconfig
from dataclasses import dataclass
from pathlib import Path

HELD_OUT_BUCKETS = 10  # one file in ten is held out
SITE_PREFIX = "site-packages/"  # third-party files' names in the training manifest
MANIFEST = Path(__file__).resolve().parent / "weights" / "train_manifest.txt"


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


@functools.cache
def trained_files() -> frozenset[str]:
    """The files the shipped demo pair was trained on (its manifest; empty if it has none)."""
    return frozenset(MANIFEST.read_text().split()) if MANIFEST.exists() else frozenset()


def _site_files(skip_dirs: tuple[str, ...]):
    for sp in site.getsitepackages():
        yield from iter_python_files(Path(sp), skip_dirs=skip_dirs)


def third_party_files(limit: int | None = None) -> list[SourceFile]:
    """Python sources of installed third-party packages that the shipped demo pair was not
    trained on (all of them for a pair trained on the stdlib alone): code it never saw."""
    files: list[SourceFile] = []
    trained = trained_files()
    for f in _site_files(("__pycache__", "tests", "test")):
        if SITE_PREFIX + f.relpath in trained:
            continue
        files.append(f)
        if limit is not None and len(files) >= limit:
            return files
    return files


def code_split() -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, held_out) files of the `code` corpus: the standard library, then every installed
    third-party package's sources (named SITE_PREFIX + their path in the manifest)."""
    train, held = stdlib_split()
    for f in _site_files(("__pycache__",)):
        f = SourceFile(f.root, SITE_PREFIX + f.relpath, f.text)
        (held if is_held_out(f.relpath) else train).append(f)
    return train, held


def def_prompts(files: list[SourceFile], tokenizer, count: int, max_prompt_tokens: int, rng: random.Random) -> list[list[int]]:
    """Up to `count` prompts, one per file in order (a file without a `def` line gives none),
    each ending with a `def` line `rng` picks and the lines before it, so the model writes a
    function body."""
    prompts = []
    for f in files:
        lines = f.text.splitlines(keepends=True)
        defs = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ") and line.rstrip().endswith(":")]
        if not defs:
            continue
        i = rng.choice(defs)
        ids = tokenizer("".join(lines[max(0, i - 12) : i + 1]))["input_ids"]
        prompts.append(ids[-max_prompt_tokens:])
        if len(prompts) == count:
            break
    return prompts
