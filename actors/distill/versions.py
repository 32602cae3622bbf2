"""Drafter weight versions on disk: safetensors files with JSON metadata, in publish order.

A restarted cluster resumes from `latest()`: the newest version that was published, promoted
(entries without the flag count as promoted) and not rolled back. Files are written under a temporary name and renamed into place, so a crash
mid-write never leaves a half version that `latest()` could return.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class VersionStore:
    """Versions of one drafter's weights under `root` (index.json + one .safetensors each)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index = self.root / "index.json"

    def versions(self) -> list[dict]:
        """Metadata of every version, oldest first."""
        if not self._index.exists():
            return []
        return json.loads(self._index.read_text())

    def latest(self) -> dict | None:
        """The newest promoted version not rolled back, or None."""
        live = [v for v in self.versions() if not v.get("rolled_back") and v.get("promoted", True)]
        return live[-1] if live else None

    def entry(self, version: str) -> dict:
        """The metadata of `version` (KeyError naming the known ones if there is none)."""
        return self._entry(version)

    def mark(self, version: str, **fields) -> dict:
        """Update `version`'s metadata (e.g. promoted=True); returns it."""
        entries = self.versions()
        self._entry(version)
        for e in entries:
            if e["version"] == version:
                e.update(fields)
                updated = e
        self._write_index(entries)
        return updated

    def publish(self, state: dict[str, torch.Tensor], version: str, meta: dict | None = None) -> dict:
        """Persist `state` as `version` (a new name) and make it the latest; returns its metadata."""
        if not _NAME.match(version):
            raise ValueError(f"version name {version!r}: letters, digits, '.', '_' and '-' only")
        if any(v["version"] == version for v in self.versions()):
            raise ValueError(f"version {version} already exists")
        path = self.root / f"{version}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file({k: t.detach().contiguous().cpu() for k, t in state.items()}, str(tmp),
                  metadata={"version": version})
        os.replace(tmp, path)
        entry = {"version": version, "file": path.name, "published_s": time.time(), **(meta or {})}
        self._write_index(self.versions() + [entry])
        return entry

    def load(self, version: str) -> dict[str, torch.Tensor]:
        """The weights of `version`."""
        entry = self._entry(version)
        return load_file(str(self.root / entry["file"]))

    def rollback(self, version: str, reason: str) -> dict | None:
        """Mark `version` rolled back (kept on disk, never `latest`); returns the new latest."""
        entries = self.versions()
        self._entry(version)
        for e in entries:
            if e["version"] == version:
                e["rolled_back"], e["rollback_reason"] = True, reason
        self._write_index(entries)
        return self.latest()

    def _entry(self, version: str) -> dict:
        for e in self.versions():
            if e["version"] == version:
                return e
        raise KeyError(f"no drafter version {version!r} (known: {[v['version'] for v in self.versions()]})")

    def _write_index(self, entries: list[dict]) -> None:
        tmp = self._index.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, self._index)
