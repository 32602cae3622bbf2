"""The serving scheduler without Ray: admission, queue bound, cancellation, drain, streaming."""

from __future__ import annotations

import asyncio

import pytest

from specserve.actors.engine.drafters import ModelDrafter
from specserve.actors.engine.request import make_params
from specserve.actors.errors import DrainingError, OverloadedError
from specserve.actors.scheduler import Scheduler

from .engine.tiny import always_drafting_engine, build_model, family_config, hf_greedy, runner

PROMPTS = [[7, 8, 9], [3, 41, 9, 88], [5, 6, 7, 5, 6, 7], list(range(20, 30))]


@pytest.fixture(scope="module")
def models():
    target = build_model(family_config("llama"), seed=0)
    return target, build_model(family_config("llama", layers=1), seed=1)


def scheduler(models, slots=2, max_queue=2) -> Scheduler:
    target, drafter = models
    engine = always_drafting_engine(runner(target, max_num_seqs=slots),
                                    ModelDrafter(runner(drafter, max_num_seqs=slots), confidence_threshold=0.0), 3)
    return Scheduler(engine, max_queue=max_queue)


async def collect(s: Scheduler, req):
    return [c async for c in s.stream(req)]


def test_requests_beyond_slots_queue_and_all_finish_with_the_targets_output(models):
    target, _ = models
    s = scheduler(models)

    async def main():
        reqs = [s.submit(p, make_params(max_tokens=12)) for p in PROMPTS]  # 2 slots + 2 queued
        return await asyncio.gather(*(collect(s, r) for r in reqs))

    try:
        chunks = asyncio.run(main())
    finally:
        s.shutdown()
    for prompt, cs in zip(PROMPTS, chunks):
        assert [t for c in cs for t in c.token_ids] == hf_greedy(target, prompt, 12)
        assert cs[-1].finish_reason == "length" and all(c.finish_reason is None for c in cs[:-1])
    assert s.engine.target.cache.num_free == 2


def test_a_full_queue_is_refused_with_overloaded(models):
    s = scheduler(models, slots=1, max_queue=1)

    async def main():
        # long enough to hold the only slot while the queue fills, however fast this machine is
        first = s.submit(PROMPTS[0], make_params(max_tokens=120, ignore_eos=True))
        for _ in range(1000):  # until the engine thread admits it: the queue is empty again
            if s.load == (1, 0):
                break
            await asyncio.sleep(0.005)
        assert s.load == (1, 0)
        second = s.submit(PROMPTS[1], make_params(max_tokens=5))
        with pytest.raises(OverloadedError):
            s.submit(PROMPTS[2], make_params(max_tokens=5))
        s.cancel(first)  # frees the slot for the queued one
        chunks = await collect(s, second)
        assert chunks[-1].finish_reason is not None

    try:
        asyncio.run(main())
    finally:
        s.shutdown()


def test_leaving_a_stream_early_cancels_the_request_and_frees_both_caches(models):
    s = scheduler(models)

    async def main():
        req = s.submit(PROMPTS[3], make_params(max_tokens=100))
        stream = s.stream(req)
        await stream.__anext__()
        await stream.aclose()  # the client went away
        for _ in range(100):
            if not s.running:
                break
            await asyncio.sleep(0.02)

    try:
        asyncio.run(main())
    finally:
        s.shutdown()
    assert not s.running and s.engine.target.cache.num_free == 2
    assert s.engine.drafter.runner.cache.num_free == 2 and not s.engine.drafter.seqs


def test_drain_refuses_new_requests_and_lets_admitted_ones_finish(models):
    target, _ = models
    s = scheduler(models)

    async def main():
        req = s.submit(PROMPTS[1], make_params(max_tokens=16))
        drained = asyncio.get_running_loop().run_in_executor(None, s.drain, 30.0)
        chunks = await collect(s, req)
        assert await drained
        with pytest.raises(DrainingError):
            s.submit(PROMPTS[0], make_params(max_tokens=4))
        return chunks

    try:
        chunks = asyncio.run(main())
    finally:
        s.shutdown()
    assert [t for c in chunks for t in c.token_ids] == hf_greedy(target, PROMPTS[1], 16)


def test_invalid_requests_are_refused_before_queueing(models):
    from specserve.actors.engine.request import InvalidRequestError

    s = scheduler(models)

    async def main():
        with pytest.raises(InvalidRequestError, match="prompt_token_ids"):
            s.submit([1, 10_000], make_params())

    try:
        asyncio.run(main())
    finally:
        s.shutdown()
    assert not s.waiting
