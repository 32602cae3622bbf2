"""`specserve bench --transport`: what one verifier<->drafter round trip costs on this machine.

One small message goes to another process on loopback and comes back, one round at a time,
over three transports:
  tcp        a raw TCP socket echo: the floor the operating system sets
  grpc-echo  a bare gRPC bidirectional stream (the pattern of the Drafting stream: a sync client
             fed by a queue, a grpc.aio server), echoing each message
  drafting   specserve's own Drafting stream: a RemoteDrafterPool asking a draft server (a
             DraftWorker around an n-gram drafter, which drafts in microseconds) for 4 tokens
             and sending the verdict, exactly as a verifier does
Each runs back to back and with an idle gap between rounds (a verify step, during which the
drafter waits): a process that slept wakes more slowly than one that was just running.
`drafting` also reports the overhead a verifier measures (round trip less the drafter's own
drafting time), the figure `bench --serving` reports as rtt50ms, and where its round trip goes:
the median of each hop between two hand-offs (actors/hops.py), timed in both processes.
"""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time

import grpc

from specserve.cluster.reporting import percentile, text_table, write_report

MESSAGE = 48  # bytes of the echoed message: about a draft of 4 tokens
TRANSPORTS = ("tcp", "grpc-echo", "drafting")


# -- servers: each in a process of its own, printing its port -------------------------------------

def _serve_tcp() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := conn.recv(4096):
        conn.sendall(data)


def _echo_handler():
    from grpc_health.v1 import health_pb2

    async def chat(requests, context):
        async for msg in requests:
            yield msg

    return grpc.stream_stream_rpc_method_handler(chat, request_deserializer=health_pb2.HealthCheckRequest.FromString,
                                                 response_serializer=health_pb2.HealthCheckRequest.SerializeToString)


async def _serve_grpc_echo() -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("echo.Echo", {"Chat": _echo_handler()})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


async def _serve_drafting() -> None:
    from specserve.actors.draft_server import DraftWorker, serve_drafting
    from specserve.actors.engine.drafters import NgramDrafter

    from specserve.actors import hops

    hops.enable()
    worker = DraftWorker(NgramDrafter(), "ngram", pipelined=False)
    worker.start()
    server, port = await serve_drafting(worker, "127.0.0.1")
    print(port, flush=True)

    def dump_marks():  # a line on stdin: print this process's hand-off marks
        while sys.stdin.readline():
            print(json.dumps(hops.marks()), flush=True)

    threading.Thread(target=dump_marks, daemon=True).start()
    await server.wait_for_termination()


def _server(transport: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "specserve.cluster.bench_transport", transport],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise RuntimeError(f"the {transport} server did not start")
    return proc, int(line)


# -- clients: one round trip per call --------------------------------------------------------------

class _Tcp:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def round_trip(self, i: int) -> None:
        self.sock.sendall(b"x" * MESSAGE)
        got = 0
        while got < MESSAGE:
            got += len(self.sock.recv(4096))

    def close(self) -> None:
        self.sock.close()


class _GrpcEcho:
    def __init__(self, port: int):
        from grpc_health.v1 import health_pb2

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.sendq: queue.SimpleQueue = queue.SimpleQueue()
        chat = self.channel.stream_stream("/echo.Echo/Chat",
                                          request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                                          response_deserializer=health_pb2.HealthCheckRequest.FromString)
        self.call = chat(iter(self.sendq.get, None))
        self.msg = health_pb2.HealthCheckRequest(service="x" * (MESSAGE - 2))

    def round_trip(self, i: int) -> None:
        self.sendq.put(self.msg)
        next(self.call)

    def close(self) -> None:
        self.sendq.put(None)
        self.call.cancel()
        self.channel.close()


class _Drafting:
    def __init__(self, port: int):
        from specserve.actors import hops
        from specserve.actors.engine.drafters import DraftRequest
        from specserve.actors.engine.request import make_params
        from specserve.actors.remote_drafter import DrafterEndpoint, RemoteDrafterPool

        hops.enable()
        endpoint = DrafterEndpoint(f"127.0.0.1:{port}")
        self.pool = RemoteDrafterPool(lambda: [endpoint], vocab_size=1024, deadline_s=5.0)
        self.request = [DraftRequest(0, 4)]
        self.pool.start(0, [7, 8, 9, 7, 8, 9, 7, 8], make_params(max_tokens=1_000_000))
        self.pool.propose(self.request)  # attaches the sequence: its first answer follows a prefill
        self.pool.verdict(0, 0, 9)
        self.pool.overheads.clear()

    def round_trip(self, i: int) -> None:
        draft = self.pool.propose(self.request)[0]
        self.pool.verdict(0, min(len(draft.tokens), 1), 7 + i % 3)

    def close(self) -> None:
        self.pool.close()


CLIENTS = {"tcp": _Tcp, "grpc-echo": _GrpcEcho, "drafting": _Drafting}


SEGMENTS = ("engine to gRPC thread", "transit out", "loop to worker", "drafting", "worker to loop",
            "transit back", "reader to engine")  # between consecutive hops.HOPS


def hop_breakdown(ours: list, theirs: list, start: float, end: float) -> dict:
    """Median ms of each segment of the round trips between `start` and `end`. A round trip runs
    from our `pool.send` to our `engine.woke`; the drafter's marks inside that window are its
    own (one round trip at a time). Rounds missing a mark, or with one twice, are left out."""
    from specserve.actors.hops import HOPS

    ours = sorted((t, h) for h, t in ours if start <= t <= end)
    theirs = sorted((t, h) for h, t in theirs if start <= t <= end)
    rounds, current = [], None
    for t, hop in ours:
        if hop == "pool.send":
            current = [(t, hop)]
            rounds.append(current)
        elif current is not None:
            current.append((t, hop))
    per_segment: dict[str, list[float]] = {name: [] for name in SEGMENTS}
    used = 0
    for r in rounds:
        lo, hi = r[0][0], r[-1][0]
        marks = r + [m for m in theirs if lo <= m[0] <= hi]
        by_hop = {}
        for t, hop in marks:
            by_hop.setdefault(hop, []).append(t)
        if sorted(by_hop) != sorted(HOPS) or any(len(v) != 1 for v in by_hop.values()):
            continue
        times = [by_hop[h][0] for h in HOPS]
        if times != sorted(times):
            continue
        used += 1
        for name, a, b in zip(SEGMENTS, times, times[1:]):
            per_segment[name].append(b - a)
    out = {name: round(1000 * statistics.median(v), 3) for name, v in per_segment.items() if v}
    return out | {"rounds_traced": used}


def _measure(client, rounds: int, gap_s: float) -> list[float]:
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        client.round_trip(i)
        times.append(time.perf_counter() - t0)
        if gap_s:
            time.sleep(gap_s)
    return times


def _their_marks(proc: subprocess.Popen) -> list:
    """The drafting server process's hand-off marks so far."""
    proc.stdin.write("\n")
    proc.stdin.flush()
    return [tuple(m) for m in json.loads(proc.stdout.readline())]


def run_bench_transport(rounds: int, gaps_ms: list[float], progress=print) -> dict:
    """Every transport at every gap; servers are started and stopped here."""
    from specserve.actors import hops

    rows = []
    for transport in TRANSPORTS:
        proc, port = _server(transport)
        try:
            client = CLIENTS[transport](port)
            try:
                _measure(client, min(rounds, 50), 0.0)  # warm-up: connections, first-call setup
                for gap in gaps_ms:
                    if isinstance(client, _Drafting):
                        client.pool.overheads.clear()
                    start = time.perf_counter()
                    times = _measure(client, rounds, gap / 1000)
                    end = time.perf_counter()
                    row = {"transport": transport, "gap_ms": gap, "rounds": rounds,
                           "rtt_p50_ms": round(1000 * statistics.median(times), 3),
                           "rtt_p90_ms": round(1000 * percentile(times, 0.9), 3)}
                    if isinstance(client, _Drafting):
                        row["overhead_p50_ms"] = round(1000 * statistics.median(client.pool.overheads), 3)
                        row["hops_p50_ms"] = hop_breakdown(hops.marks(), _their_marks(proc), start, end)
                    rows.append(row)
                    progress(f"{transport}, gap {gap:g} ms: median {row['rtt_p50_ms']:.3f} ms")
            finally:
                client.close()
        finally:
            proc.kill()
            proc.wait(timeout=10)
    return {"config": {"rounds": rounds, "gaps_ms": gaps_ms, "message_bytes": MESSAGE}, "rows": rows}


def format_table(report: dict) -> str:
    cols = ["transport", "gap_ms", "rounds", "rtt_p50_ms", "rtt_p90_ms", "overhead_p50_ms"]
    head = ["transport", "gap_ms", "rounds", "rtt50ms", "rtt90ms", "overhead50"]
    table = text_table(report["rows"], cols, head, 10)
    traced = [r for r in report["rows"] if r.get("hops_p50_ms")]
    if traced:
        hop_rows = [{"gap_ms": r["gap_ms"], **r["hops_p50_ms"]} for r in traced]
        cols = ["gap_ms", *SEGMENTS, "rounds_traced"]
        head = ["gap_ms", "to_grpc", "transit_out", "to_worker", "drafting", "to_loop", "transit_back", "to_engine", "traced"]
        table += "\n\ndrafting: median ms per hop\n" + text_table(hop_rows, cols, head, 10)
    return table


def bench_transport_main(args) -> int:
    """CLI entry: run, print the table, write JSON."""
    gaps = [float(g) for g in args.gaps.split(",")]
    if args.round_trips < 1 or any(g < 0 for g in gaps):
        raise SystemExit("--round-trips must be >= 1 and --gaps >= 0")
    report = run_bench_transport(args.round_trips, gaps)
    write_report(report, format_table(report), args.out)
    return 0


if __name__ == "__main__":  # a server process of run_bench_transport
    which = sys.argv[1]
    if which == "tcp":
        _serve_tcp()
    elif which == "grpc-echo":
        asyncio.run(_serve_grpc_echo())
    elif which == "drafting":
        asyncio.run(_serve_drafting())
    else:
        raise SystemExit(f"unknown transport {which!r}")
