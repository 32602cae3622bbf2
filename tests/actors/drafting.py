"""A real draft server (grpc.aio on loopback) on its own event-loop thread, for tests."""

from __future__ import annotations

import asyncio
import threading

from specserve.actors.draft_server import DraftWorker, serve_drafting
from specserve.actors.engine.drafters import BaseDrafter
from specserve.actors.remote_drafter import DrafterEndpoint


class DraftServerThread:
    """Starts a DraftWorker behind a loopback draft server; `stop()` kills it like a dead replica."""

    def __init__(self, drafter: BaseDrafter, version: str = "v0", pipelined: bool = False):
        self.worker = DraftWorker(drafter, version, pipelined=pipelined)
        self.worker.start()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server, self.port = self._run(serve_drafting(self.worker, "127.0.0.1"))

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    @property
    def endpoint(self) -> DrafterEndpoint:
        return DrafterEndpoint(f"127.0.0.1:{self.port}")

    def stop(self) -> None:
        self._run(self.server.stop(None))
        self.worker.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
