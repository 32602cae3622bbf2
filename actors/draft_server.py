"""The drafter side of the Drafting stream: a grpc.aio servicer in front of one engine drafter.

Many verifier streams feed one worker thread, which owns the drafter (torch work must not run
on the event loop). The worker drains every message that has arrived, applies them in order,
and answers all the Starts and Verdicts of that wave with one batched `propose` call. When it
has nothing to answer and pipelining is on, it spends idle time drafting ahead (one forward
at a time, so a Verdict never waits for more than one forward).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import grpc

from specserve.actors import hops
from specserve.actors.convert import draft_to_pb, speculation_to_pb, start_params
from specserve.actors.engine.drafters import BaseDrafter, DraftRequest
from specserve.actors.engine.kv_cache import CacheBudgetError
from specserve.actors.security import TlsFiles, bind
from specserve.v1 import drafting_pb2, drafting_pb2_grpc

log = logging.getLogger(__name__)
_CLOSED = object()


@dataclass
class _Stream:
    """One verifier's stream: its outbox lives on the event loop."""

    stream_id: int
    outbox: asyncio.Queue
    loop: asyncio.AbstractEventLoop

    def send(self, msg) -> None:
        self.loop.call_soon_threadsafe(self.outbox.put_nowait, msg)


@dataclass
class _Swap:
    """A weight swap waiting in the worker's inbox."""

    state: dict
    version: str
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


class DraftWorker:
    """Owns the drafter; turns verifier messages into drafts on its own thread."""

    def __init__(self, drafter: BaseDrafter, weight_version: str = "", max_num_seqs: int = 64,
                 pipelined: bool = True):
        self.drafter = drafter
        self.weight_version = weight_version
        self.max_num_seqs = max_num_seqs
        self.pipelined = pipelined
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.seq_ids: dict[tuple[int, int], int] = {}  # (stream, sequence_id) -> drafter seq id
        self.routes: dict[int, tuple[_Stream, int]] = {}  # drafter seq id -> (stream, sequence_id), for pushes
        self.pushes_sent = 0
        self._next = itertools.count()
        self._thread = threading.Thread(target=self._run, name="draft-worker", daemon=True)
        self._running = True
        self.drafts_sent = 0

    @property
    def load(self) -> int:
        """Live sequences (the registry's load figure and the autoscaling metric)."""
        return len(self.seq_ids)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self.inbox.put(_CLOSED)
        self._thread.join(timeout=5)

    def swap_weights(self, state: dict, version: str, timeout_s: float = 60.0) -> None:
        """Hot swap: new drafter weights, applied on the worker thread between waves.

        Returns once they are in use. Live sequences keep drafting; their caches are rebuilt
        from their contexts on the next draft. Raises what loading raised (the old weights stay).
        """
        swap = _Swap(state, version)
        self.inbox.put(swap)
        if not swap.done.wait(timeout_s):
            raise TimeoutError(f"the draft worker did not load weights {version} within {timeout_s} s")
        if swap.error is not None:
            raise swap.error

    def _swap(self, swap: "_Swap") -> None:
        try:
            self.drafter.swap_weights(swap.state, swap.version)
            self.weight_version = swap.version
        except Exception as e:  # a bad checkpoint leaves the old weights serving
            swap.error = e
        finally:
            swap.done.set()

    def close_stream(self, stream: _Stream) -> None:
        """The verifier went away: forget its sequences (on the worker thread)."""
        self.inbox.put((stream, None))

    # -- worker thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        while self._running:
            wave = self._collect()
            try:
                self._handle(wave)
            except Exception:  # a bug must not kill the replica's drafting for everyone
                log.exception("draft worker failed on a wave of %d messages", len(wave))

    def _collect(self) -> list:
        """Block for the first message (unless ahead-drafting has work), then drain the rest."""
        wave = []
        while not wave:
            try:
                busy = self.pipelined and self.drafter.has_ahead_work()
                item = self.inbox.get_nowait() if busy else self.inbox.get(timeout=0.5)
            except queue.Empty:
                if self.pipelined:
                    self.drafter.draft_ahead()
                    self._push()
                if not self._running:
                    return []
                continue
            if item is _CLOSED:
                return []
            wave.append(item)
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return wave
            if item is _CLOSED:
                self._running = False
                return wave
            wave.append(item)

    def _handle(self, wave: list) -> None:
        """Apply a wave of messages and answer them. Starts go last (in their order) unless
        the wave also holds a swap, a closed stream or another message about a started
        sequence: a Start prefills its whole prompt, which the verifier does not wait for,
        and the rounds it does wait for in the same wave should not wait for that prefill."""
        hops.mark("worker.take")
        starts, others = [], []
        for item in wave:
            is_start = not isinstance(item, _Swap) and item[1] is not None and item[1].HasField("start")
            (starts if is_start else others).append(item)
        if not starts or not others:
            return self._handle_in_order(wave)
        started = {(stream.stream_id, msg.start.sequence_id) for stream, msg in starts}
        if any(isinstance(item, _Swap) or item[1] is None or _key(*item) in started for item in others):
            return self._handle_in_order(wave)
        self._handle_in_order(others)
        self._handle_in_order(starts)

    def _handle_in_order(self, wave: list) -> None:
        pending: dict[int, tuple[_Stream, int, int, int]] = {}  # seq -> (stream, wire id, k, tree nodes)
        for item in wave:
            if isinstance(item, _Swap):  # between drafts: what was asked before gets the old weights
                if pending:
                    self._answer(pending)
                    pending = {}
                self._swap(item)
                continue
            stream, msg = item
            if msg is None:
                self._drop_stream(stream)
                continue
            kind = msg.WhichOneof("message")
            stream_id, wire_id = _key(stream, msg)
            seq = self.seq_ids.get((stream_id, wire_id))
            if seq is not None and seq in pending:  # answer the earlier message first: order matters
                self._answer(pending)
                pending = {}
            if kind == "start":
                seq = self._start(stream, msg.start)
                if seq is None:
                    stream.send(_unknown(wire_id, self.weight_version))
                else:
                    pending[seq] = (stream, wire_id, msg.start.k, msg.start.tree_nodes)
            elif kind == "verdict":
                if seq is None:
                    stream.send(_unknown(wire_id, self.weight_version))
                    continue
                if not self._verdict(seq, msg.verdict):
                    stream.send(_unknown(wire_id, self.weight_version))  # cannot follow it: start over
                    self._stop(stream.stream_id, wire_id)
                    continue
                if msg.verdict.taken:  # the verifier verifies what was pushed: nothing to answer
                    self.drafter.took(seq, list(msg.verdict.taken), msg.verdict.k)
                    continue
                pending[seq] = (stream, wire_id, msg.verdict.k, msg.verdict.tree_nodes)
            elif kind == "stop" and seq is not None:
                self._stop(stream.stream_id, wire_id)
        if pending:
            self._answer(pending)

    def _verdict(self, seq: int, verdict) -> bool:
        """Apply a Verdict; False when it does not fit the last draft (a confused verifier)."""
        last = self.drafter.seqs[seq].last_draft
        path = list(verdict.path) or None
        if (path is not None and (len(path) != verdict.accepted or any(i >= len(last) for i in path))) \
                or verdict.accepted > len(last):
            return False
        self.drafter.verdict(seq, verdict.accepted, verdict.next_token, path)
        for token in verdict.then_tokens:  # steps it drafted nothing for
            self.drafter.verdict(seq, 0, token)
        return True

    def _start(self, stream: _Stream, start) -> int | None:
        key = (stream.stream_id, start.sequence_id)
        if key in self.seq_ids:
            self._stop(*key)
        if len(self.seq_ids) >= self.max_num_seqs:
            return None
        seq = next(self._next)
        try:
            self.drafter.start(seq, list(start.prompt_token_ids), start_params(start))
        except (CacheBudgetError, ValueError) as e:
            log.warning("cannot draft a new sequence: %s", e)
            self.drafter.stop(seq)
            return None
        self.drafter.seqs[seq].push = start.push and self.pipelined and start.tree_nodes == 0
        self.drafter.seqs[seq].push_outcomes = max(1, start.push_outcomes)
        self.seq_ids[key] = seq
        self.routes[seq] = (stream, start.sequence_id)
        return seq

    def _stop(self, stream_id: int, wire_id: int) -> None:
        seq = self.seq_ids.pop((stream_id, wire_id), None)
        if seq is not None:
            self.routes.pop(seq, None)
            self.drafter.stop(seq)

    def _push(self) -> None:
        """Send the drafts made ahead that are ready to the verifiers' speculation caches."""
        for seq, length, last, draft in self.drafter.take_pushes():
            stream, wire_id = self.routes[seq]
            stream.send(speculation_to_pb(wire_id, length, last, draft, self.weight_version, 0.0))
            self.pushes_sent += 1

    def _drop_stream(self, stream: _Stream) -> None:
        for key in [k for k in self.seq_ids if k[0] == stream.stream_id]:
            self._stop(*key)

    def _answer(self, pending: dict[int, tuple[_Stream, int, int, int]]) -> None:
        """One batched propose for every sequence of the wave; its time is each draft's time."""
        seqs = list(pending)
        t0 = time.perf_counter()
        drafts = self.drafter.propose([DraftRequest(s, pending[s][2], pending[s][3]) for s in seqs])
        seconds = time.perf_counter() - t0
        hops.mark("worker.sent")  # before the sends: the event loop may write the first at once
        for seq, draft in zip(seqs, drafts):
            stream, wire_id, _, _ = pending[seq]
            stream.send(draft_to_pb(wire_id, draft, self.weight_version, seconds))
            self.drafts_sent += 1


def _key(stream: _Stream, msg) -> tuple[int, int]:
    """(stream, sequence id) a verifier message is about."""
    return stream.stream_id, getattr(msg, msg.WhichOneof("message")).sequence_id


def _unknown(wire_id: int, version: str) -> drafting_pb2.DrafterMessage:
    return drafting_pb2.DrafterMessage(
        draft=drafting_pb2.Draft(sequence_id=wire_id, unknown_sequence=True, weight_version=version))


class DraftingServicer(drafting_pb2_grpc.DraftingServicer):
    """grpc.aio servicer: one `Draft` call per verifier connection."""

    def __init__(self, worker: DraftWorker):
        self.worker = worker
        self._ids = itertools.count()

    async def Draft(self, request_iterator, context):
        stream = _Stream(next(self._ids), asyncio.Queue(), asyncio.get_running_loop())
        reader = asyncio.ensure_future(self._read(request_iterator, stream))
        try:
            while True:
                msg = await stream.outbox.get()
                if msg is _CLOSED:
                    return
                hops.mark("loop.write")
                yield msg
        finally:
            reader.cancel()
            self.worker.close_stream(stream)

    async def _read(self, request_iterator, stream: _Stream) -> None:
        try:
            async for msg in request_iterator:
                hops.mark("loop.read")
                self.worker.inbox.put((stream, msg))
        except (asyncio.CancelledError, grpc.RpcError):
            pass
        finally:
            stream.outbox.put_nowait(_CLOSED)


async def serve_drafting(worker: DraftWorker, host: str, port: int = 0,
                         tls: TlsFiles | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a grpc.aio server for `worker` on host:port (0 = any free port); returns (server, port).

    With `tls` (cert, key and CA) it is mutual TLS: verifiers must present a certificate of the CA.
    """
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    drafting_pb2_grpc.add_DraftingServicer_to_server(DraftingServicer(worker), server)
    bound = bind(server, f"{host}:{port}", tls, "security.internal_tls")
    if bound == 0:
        raise OSError(f"cannot bind the draft server to {host}:{port}")
    await server.start()
    return server, bound
