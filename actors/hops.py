"""Timestamps at the hand-offs of a draft round trip, for `specserve bench --transport`.

Off unless `enable()` was called in the process; then each hand-off appends (hop, time) to one
list. `time.perf_counter` is the system-wide monotonic clock on Linux, so the marks of the
verifier's and the drafter's processes on one machine line up.

A round trip's hops, in order:
  pool.send    the engine thread hands a Verdict to its stream's send queue (RemoteDrafterPool)
  grpc.take    gRPC's thread takes it from the queue to write it
  loop.read    the drafter's event loop has read it from the stream
  worker.take  the draft worker starts on the wave that holds it
  worker.sent  the worker has the Draft and queues it for the stream
  loop.write   the stream hands the Draft to gRPC to write
  reader.got   the verifier's reader thread has read the Draft
  engine.woke  the engine thread, waiting for drafts in `propose`, has it
"""

from __future__ import annotations

import time

HOPS = ("pool.send", "grpc.take", "loop.read", "worker.take", "worker.sent", "loop.write", "reader.got",
        "engine.woke")
_marks: list[tuple[str, float]] | None = None


def enable() -> None:
    global _marks
    _marks = []


def mark(hop: str) -> None:
    if _marks is not None:
        _marks.append((hop, time.perf_counter()))


def marks() -> list[tuple[str, float]]:
    return list(_marks or [])
