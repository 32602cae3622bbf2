"""Continuous batching for a serving verifier: requests join and leave the engine between steps.

The engine runs on one thread of its own (torch work must not block the event loop that
serves the client streams). Requests are validated and admitted on the event loop side;
beyond the running batch (the KV-cache slots) at most `max_queue` wait, and a request that
finds the queue full is refused with OverloadedError (RESOURCE_EXHAUSTED) instead of waiting
without bound. Each request's tokens come back as `Chunk`s through an asyncio queue; a client
that goes away cancels its request, which frees its slots on the verifier and the drafter.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from specserve.actors.engine.engine import SpeculativeEngine, StepOutput
from specserve.actors.engine.request import SamplingParams, SpecStats
from specserve.actors.errors import DrainingError, OverloadedError

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """What a request gained in one step: tokens, the text they completed, stats so far."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    stats: SpecStats
    drafter_version: str = ""


def _merge(a: Chunk, b: Chunk) -> Chunk:
    """Two consecutive chunks of a request as one."""
    return Chunk(a.token_ids + b.token_ids, a.text + b.text, b.finish_reason, b.stats,
                 b.drafter_version or a.drafter_version)


@dataclass
class StepReport:
    """One engine step, for metrics."""

    batch_size: int
    seconds: float
    drafted: int
    accepted_per_position: list[int]  # accepted drafts at positions 1..k, summed over the batch
    by_version: dict[str, tuple[int, int, int]]  # drafter weight version -> (drafted, accepted, empty draft steps)


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    seq_id: int | None = None
    sent_text: str = ""
    cancelled: bool = False
    finished: bool = False

    def push(self, item: Chunk | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class Scheduler:
    """Runs a SpeculativeEngine for many concurrent streaming requests."""

    def __init__(self, engine: SpeculativeEngine, max_queue: int = 64, retry_after_s: float = 1.0,
                 on_step: Callable[[StepReport], None] | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.on_step = on_step
        self.waiting: collections.deque[_Request] = collections.deque()
        self.running: dict[int, _Request] = {}
        self.draining = False
        self._cancels: list[_Request] = []
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="verifier-engine", daemon=True)
        self._thread.start()

    # -- event-loop side -------------------------------------------------------------------------

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> _Request:
        """Validate and enqueue; raises InvalidRequestError, OverloadedError or DrainingError."""
        self.engine.validate(prompt_ids, params)
        req = _Request(prompt_ids, params, asyncio.get_running_loop())
        with self._cond:
            if self.draining or self._stopped:
                raise DrainingError("the server is draining; retry on another replica")
            if len(self.waiting) >= self.max_queue + max(0, self.engine.target.cache.num_free):
                raise OverloadedError(f"{len(self.running)} requests running and {len(self.waiting)} queued",
                                      self.retry_after_s)
            self.waiting.append(req)
            self._cond.notify()
        return req

    async def stream(self, req: _Request) -> AsyncIterator[Chunk]:
        """The request's chunks until it finishes; leaving early cancels it."""
        try:
            while True:
                item = await req.out.get()
                if isinstance(item, BaseException):
                    raise item
                # a slow reader gets what piled up as one chunk, not one message per step
                while not item.finish_reason and not req.out.empty():
                    more = req.out.get_nowait()
                    if isinstance(more, BaseException):
                        req.out.put_nowait(more)  # raised after what came before it
                        break
                    item = _merge(item, more)
                yield item
                if item.finish_reason:
                    return
        finally:
            if not req.finished:
                self.cancel(req)

    def cancel(self, req: _Request) -> None:
        with self._cond:
            req.cancelled = True
            self._cancels.append(req)
            self._cond.notify()

    @property
    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        return len(self.running), len(self.waiting)

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Refuse new requests, let the admitted ones finish; True if all did within the timeout."""
        with self._cond:
            self.draining = True
            end = time.monotonic() + timeout_s
            while (self.waiting or self.running) and time.monotonic() < end:
                self._cond.wait(0.05)
            return not (self.waiting or self.running)

    def shutdown(self) -> None:
        """Stop the engine thread; requests still running end with DrainingError."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self.waiting or self.running or self._cancels or self._stopped):
                    self._cond.wait(0.5)
                if self._stopped:
                    break
                cancels, self._cancels = self._cancels, []
            self._release_cancelled(cancels)
            self._admit()
            if self.running:
                self._step()
        self._fail_all(DrainingError("the server shut down"))

    def _release_cancelled(self, cancels: list[_Request]) -> None:
        for req in cancels:
            if req.seq_id is not None and self.running.pop(req.seq_id, None) is not None:
                self.engine.release(req.seq_id)
        with self._cond:
            self._cond.notify_all()

    def _admit(self) -> None:
        while self.engine.target.cache.num_free > 0:
            with self._cond:
                if not self.waiting:
                    return
                req = self.waiting.popleft()
            if req.cancelled:
                continue
            try:
                req.seq_id = self.engine.add_request(req.prompt_ids, req.params)
            except Exception as e:  # validated already: a cache or model failure for this request only
                log.exception("admitting a request failed")
                req.finished = True
                req.push(e)
                continue
            self.running[req.seq_id] = req

    def _step(self) -> None:
        seqs_before = {i: (s.drafted, s.accepted, s.empty) for i, s in self.engine.seqs.items()}
        t0 = time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as e:
            log.exception("engine step failed; failing the running batch")
            self._fail_all(e)
            return
        if self.on_step is not None:
            self.on_step(self._report(seqs_before, time.perf_counter() - t0))
        for out in outputs:
            self._deliver(out)

    def _report(self, before: dict[int, tuple[int, int, int]], seconds: float) -> StepReport:
        drafted, per_position, by_version = 0, [], {}
        for seq_id, (d0, a0, e0) in before.items():
            s = self.engine.seqs[seq_id]
            drafted += s.drafted - d0
            accepted = s.accepted - a0
            if s.drafted > d0 or s.empty > e0:
                v = self._version(seq_id)
                old = by_version.get(v, (0, 0, 0))
                by_version[v] = (old[0] + s.drafted - d0, old[1] + accepted, old[2] + s.empty - e0)
            per_position.extend([0] * (accepted - len(per_position)))
            for i in range(accepted):
                per_position[i] += 1
        return StepReport(len(before), seconds, drafted, per_position, by_version)

    def _deliver(self, out: StepOutput) -> None:
        req = self.running.get(out.seq_id)
        if req is None:
            return
        seq = self.engine.seqs[out.seq_id]
        if out.finish_reason:
            text = seq.stops.final_text(seq.generated)
        else:
            text = seq.stops.stable_text(seq.generated)
        delta = ""
        if text.startswith(req.sent_text):  # else the decoding changed earlier text: wait for the end
            delta, req.sent_text = text[len(req.sent_text):], text
        version = self._version(out.seq_id)
        if out.finish_reason:
            req.finished = True
            self.running.pop(out.seq_id)
            self.engine.release(out.seq_id)
            with self._cond:
                self._cond.notify_all()
        req.push(Chunk(out.new_tokens, delta, out.finish_reason, seq.stats(), version))

    def _version(self, seq_id: int) -> str:
        """Weight version of the drafter that drafted for the sequence last ('' if none)."""
        version = getattr(self.engine.drafter, "version", None)
        return version(seq_id) if version else ""

    def _fail_all(self, exc: BaseException) -> None:
        for seq_id, req in list(self.running.items()):
            req.finished = True
            req.push(exc)
            self.running.pop(seq_id)
            if seq_id in self.engine.seqs:
                self.engine.release(seq_id)
        with self._cond:
            waiting, self.waiting = list(self.waiting), collections.deque()
            self._cond.notify_all()
        for req in waiting:
            req.finished = True
            req.push(exc)
