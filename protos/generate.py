"""Regenerate the checked-in Python code of the protos, or check that it is up to date.

    .venv/bin/python protos/generate.py          # rewrite protos/specserve/v1/*_pb2*.py(i)
    .venv/bin/python protos/generate.py --check  # exit 1 naming the stale files
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent  # the -I root: files are named specserve/v1/*.proto
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files(root: Path) -> list[Path]:
    """The protoc outputs under `root`."""
    return sorted(p for p in (root / "specserve").rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def generate(out: Path) -> None:
    """Run protoc over every .proto under ROOT, writing the Python code under `out`."""
    protos = sorted(str(p) for p in (ROOT / "specserve").rglob("*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{ROOT}", f"-I{well_known}",
            f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def stale_files() -> list[str]:
    """Generated files (relative to ROOT) that differ from, or are missing from, a fresh run."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = {str(p.relative_to(tmp)): p.read_bytes() for p in generated_files(Path(tmp))}
    checked_in = {str(p.relative_to(ROOT)): p.read_bytes() for p in generated_files(ROOT)}
    return sorted(n for n in fresh.keys() | checked_in.keys() if fresh.get(n) != checked_in.get(n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if any generated file is stale")
    if parser.parse_args(argv).check:
        stale = stale_files()
        for name in stale:
            print(f"stale: protos/{name} (run .venv/bin/python protos/generate.py)", file=sys.stderr)
        return 1 if stale else 0
    for path in generated_files(ROOT):  # so outputs of a deleted .proto go too
        path.unlink()
    generate(ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
