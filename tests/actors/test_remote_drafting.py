"""The engine drafting over real gRPC streams: lossless, and a drafter can only cost speed."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from specserve.actors.convert import start_pb, verdict_pb
from specserve.actors.draft_server import DraftWorker, _Stream
from specserve.actors.engine.draft_length import DraftLengthConfig
from specserve.actors.engine.drafters import DraftRequest, ModelDrafter
from specserve.actors.engine.engine import SpeculativeEngine
from specserve.actors.engine.tree_drafting import TreeDrafter
from specserve.actors.engine.request import make_params
from specserve.actors.remote_drafter import RemoteDrafterPool

from .drafting import DraftServerThread
from .engine.tiny import always_drafting_engine, build_model, family_config, hf_greedy, record_drafts, runner

NEW_TOKENS = 24
PROMPTS = [[7], [3, 41, 9, 88], [5, 6, 7, 5, 6, 7, 5, 6, 7], list(range(20, 34))]


@pytest.fixture(scope="module")
def models():
    target = build_model(family_config("llama"), seed=0)
    drafter = build_model(family_config("llama", layers=1), seed=1)
    return target, drafter, [hf_greedy(target, p, NEW_TOKENS) for p in PROMPTS]


def remote_engine(target_model, servers, k_max=4, deadline_s=5.0, **pool_kwargs):
    endpoints = [s.endpoint for s in servers]
    pool = RemoteDrafterPool(lambda: [e for e in endpoints], target_model.config.vocab_size,
                             deadline_s=deadline_s, **pool_kwargs)
    return always_drafting_engine(runner(target_model), pool, k_max), pool


def model_server(model, **kwargs) -> DraftServerThread:
    return DraftServerThread(ModelDrafter(runner(model, max_num_seqs=8), confidence_threshold=0.0), **kwargs)


def lookup_engine(target_model, server: DraftServerThread, policy: DraftLengthConfig, cost=None, lookup_min_n=1):
    """(engine, pool): `target_model` drafting through `server`, with suffix lookup in the pool
    (unless `lookup_min_n` is 0) and `cost` (a CostModel class) as the engine's cost model where given."""
    pool = RemoteDrafterPool(lambda: [server.endpoint], target_model.config.vocab_size, deadline_s=5.0,
                             lookup_min_n=lookup_min_n)
    engine = SpeculativeEngine(runner(target_model), None, pool, policy)
    if cost is not None:
        engine.cost = cost(policy)
    return engine, pool


def after_propose(pool: RemoteDrafterPool, record) -> None:
    """Call `record(reqs, drafts)` after every `propose` of `pool`."""
    propose = pool.propose

    def recording(reqs):
        drafts = propose(reqs)
        record(reqs, drafts)
        return drafts

    pool.propose = recording


@contextlib.contextmanager
def over_the_wire(target_model, server: DraftServerThread, **pool_kwargs):
    """(engine, pool) of `target_model` drafting through `server`; both closed afterwards."""
    try:
        engine, pool = remote_engine(target_model, [server], **pool_kwargs)
        try:
            yield engine, pool
        finally:
            pool.close()
    finally:
        server.stop()


def test_greedy_output_through_remote_drafter_equals_transformers(models):
    target, drafter, want = models
    server = model_server(drafter)
    with over_the_wire(target, server) as (engine, pool):
        results = engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))
        assert [r.token_ids for r in results] == want
        assert sum(r.stats.drafted for r in results) > 0 and server.worker.drafts_sent > 0


def test_the_target_drafting_for_itself_over_the_wire_has_every_draft_accepted(models):
    target, _, want = models
    server = model_server(target)
    with over_the_wire(target, server) as (engine, pool):
        results = engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))
        assert [r.token_ids for r in results] == want
        for r in results:
            assert r.stats.drafted > NEW_TOKENS // 2 and r.stats.accepted == r.stats.drafted


def test_seeded_sampling_over_the_wire_equals_the_in_process_drafter(models):
    """q crosses the wire exactly: the same seed gives the same tokens as drafting in-process."""
    target, drafter, _ = models
    params = make_params(max_tokens=NEW_TOKENS, temperature=1.0, top_k=20, seed=1234)
    local = always_drafting_engine(runner(target), ModelDrafter(runner(drafter), confidence_threshold=0.0), 4)
    want = [r.token_ids for r in local.generate(PROMPTS, params)]
    server = model_server(drafter)
    with over_the_wire(target, server) as (engine, pool):
        results = engine.generate(PROMPTS, params)
        assert [r.token_ids for r in results] == want
        assert sum(r.stats.accepted for r in results) > 0


def tree_engine(target_model, drafter, pool_or_none=None):
    """An engine asking for trees of 6 tokens, depth 3; drafting in-process or through a pool."""
    engine = always_drafting_engine(runner(target_model), pool_or_none or drafter, 3)
    engine.policy = DraftLengthConfig(k_max=3, alpha_ema=0.0, tree_nodes=6)
    return engine


def tree_server(model) -> DraftServerThread:
    return DraftServerThread(TreeDrafter(runner(model, max_num_seqs=8), branching=3))


@pytest.mark.parametrize("params", [make_params(max_tokens=NEW_TOKENS),
                                    make_params(max_tokens=NEW_TOKENS, temperature=1.0, top_k=20, seed=99)],
                         ids=["greedy", "seeded-sampling"])
def test_token_trees_over_the_wire_equal_tree_drafting_in_process(models, params):
    """Tokens, parents and q of a tree cross the wire exactly (greedy: also equal to transformers)."""
    target, drafter, want = models
    local = tree_engine(target, TreeDrafter(runner(drafter), branching=3))
    expected = [r.token_ids for r in local.generate(PROMPTS, params)]
    if params.greedy:
        assert expected == want
    server = tree_server(drafter)
    with over_the_wire(target, server, k_max=3) as (engine, pool):
        engine.policy = DraftLengthConfig(k_max=3, alpha_ema=0.0, tree_nodes=6)
        drafts = record_drafts(pool)
        results = engine.generate(PROMPTS, params)
        assert [r.token_ids for r in results] == expected
        assert any(d.parents is not None and d.parents.count(-1) > 1 for d in drafts)


def test_a_drafter_killed_mid_generation_changes_nothing_and_sequences_move_to_another(models):
    target, drafter, want = models
    first, second = model_server(drafter), model_server(drafter)
    engine, pool = remote_engine(target, [first, second], retry_s=0.05)
    try:
        ids = [engine.add_request(p, make_params(max_tokens=NEW_TOKENS)) for p in PROMPTS]
        out = {i: [] for i in ids}
        steps = 0
        while engine.seqs:
            for o in engine.step():
                out[o.seq_id].extend(o.new_tokens)
                if o.finish_reason:
                    engine.release(o.seq_id)
            steps += 1
            if steps == 3:
                busiest = max((first, second), key=lambda s: s.worker.load)
                busiest.stop()
                survivor = second if busiest is first else first
                sent_before = survivor.worker.drafts_sent
        assert [out[i] for i in ids] == want
        assert survivor.worker.drafts_sent > sent_before  # re-attached sequences got drafts again
    finally:
        pool.close()
        for s in (first, second):
            if s is not busiest:
                s.stop()


class SlowDrafter(ModelDrafter):
    """Fault injection: every draft takes `delay_s` longer than it should."""

    delay_s = 0.3

    def propose(self, reqs):
        time.sleep(self.delay_s)
        return super().propose(reqs)


def test_a_slow_drafter_misses_its_deadline_and_the_output_is_unchanged(models):
    target, drafter, want = models
    server = DraftServerThread(SlowDrafter(runner(drafter, max_num_seqs=8), confidence_threshold=0.0))
    with over_the_wire(target, server, deadline_s=0.02, retry_s=0.05) as (engine, pool):
        start = time.monotonic()
        results = engine.generate(PROMPTS[:2], make_params(max_tokens=NEW_TOKENS))
        assert [r.token_ids for r in results] == want[:2]
        assert pool.misses > 0
        # detached after max_misses: far fewer than one slow round per step
        assert time.monotonic() - start < NEW_TOKENS * SlowDrafter.delay_s / 2


def test_no_drafter_at_all_decodes_plainly(models):
    target, _, want = models
    engine, pool = remote_engine(target, [])
    results = engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))
    assert [r.token_ids for r in results] == want
    assert all(r.stats.drafted == 0 for r in results)


def test_pipelined_drafting_over_the_wire_is_lossless_and_its_ahead_work_gets_used(models):
    target, _, want = models
    server = model_server(target, pipelined=True)  # the target drafting for itself: guesses are right
    with over_the_wire(target, server) as (engine, pool):
        results = engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))
        assert [r.token_ids for r in results] == want
        assert all(r.stats.accepted == r.stats.drafted > 0 for r in results)
        assert server.worker.drafter.ahead_hits > 0


def test_pipelined_drafting_with_a_different_drafter_is_lossless(models):
    target, drafter, want = models
    server = model_server(drafter, pipelined=True)
    with over_the_wire(target, server) as (engine, pool):
        assert [r.token_ids for r in engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))] == want
        assert server.worker.drafter.ahead_hits + server.worker.drafter.ahead_misses > 0


def test_rounds_the_verifier_did_not_wait_for_do_not_count_against_acceptance(models):
    """A Start still prefilling, or no drafter at all, is not a rejected draft: alpha stays put."""
    target, _, _ = models
    engine, pool = remote_engine(target, [])
    seq = engine.add_request(PROMPTS[3], make_params(max_tokens=8))
    before = engine.seqs[seq].tracker.alpha
    engine.step()
    assert engine.seqs[seq].tracker.alpha >= before


@pytest.mark.parametrize("catch_up_wait", [4, 100])
def test_a_long_catch_up_is_fed_while_the_verifier_steps_and_drafts_come_from_the_next_step(models, catch_up_wait):
    """7 tokens of steps sat out: beyond catch_up_wait tokens the verifier does not wait for the
    draft that follows them (its round counts as not drafted); the drafter has fed them by the
    next step, which gets its draft. Within catch_up_wait the draft is awaited as before."""
    target, drafter, _ = models
    server = model_server(drafter)
    pool = RemoteDrafterPool(lambda: [server.endpoint], target.config.vocab_size, deadline_s=5.0,
                             catch_up_wait=catch_up_wait)
    try:
        pool.start(0, PROMPTS[3], make_params(max_tokens=64))
        assert pool.propose([DraftRequest(0, 2)])[0].tokens == []  # the Start: prefilling, not awaited
        end = time.monotonic() + 10
        while not pool.remote[0].answered and time.monotonic() < end:
            time.sleep(0.01)
        assert pool.remote[0].answered
        pool.verdict(0, 0, 11)
        for token in range(40, 46):  # speculation off: verdicts wait in the verifier
            assert pool.propose([DraftRequest(0, 0)])[0].tokens == []
            pool.verdict(0, 0, token)
        [back] = pool.propose([DraftRequest(0, 2)])
        if catch_up_wait < 7:
            assert back.tokens == [] and back.requested == 0
            pool.verdict(0, 0, 50)
            [back] = pool.propose([DraftRequest(0, 2)])
        assert len(back.tokens) == 2 and back.requested == 2
    finally:
        pool.close()
        server.stop()


def test_a_wave_answers_rounds_that_feed_little_before_a_start_that_prefills_its_prompt(models):
    """A Start (a prompt to prefill) and a Verdict (one token to feed) read in one wave: the
    Verdict's draft leaves first, so the round the verifier waits for does not wait for the prefill."""
    _, drafter, _ = models
    worker = DraftWorker(ModelDrafter(runner(drafter, max_num_seqs=4), confidence_threshold=0.0), "v0",
                         pipelined=False)
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        stream = _Stream(1, asyncio.run_coroutine_threadsafe(_queue(), loop).result(5), loop)
        params = make_params(max_tokens=64)
        long_prompt = list(range(5, 69))
        worker._handle([(stream, start_pb(7, PROMPTS[1], params, 0, 2))])  # B: started and fed
        worker._handle([(stream, start_pb(8, long_prompt, params, 0, 2)),  # A: a prompt to prefill
                        (stream, verdict_pb(7, 0, 11, 2))])  # B: one token to feed, then 2 drafts

        async def drain():
            out = []
            while not stream.outbox.empty():
                out.append(stream.outbox.get_nowait().draft.sequence_id)
            return out

        time.sleep(0.2)  # the sends are queued onto the loop thread
        assert asyncio.run_coroutine_threadsafe(drain(), loop).result(5) == [7, 7, 8]
    finally:
        loop.call_soon_threadsafe(loop.stop)


async def _queue() -> asyncio.Queue:
    return asyncio.Queue()


@pytest.mark.parametrize("attach_another", [False, True])
def test_a_late_draft_while_the_drafter_prefills_a_new_sequence_is_no_failed_trial(models, attach_another):
    """A draft that misses the deadline counts as a failed accept trial and a miss, unless its
    drafter is prefilling a sequence attached in the same round (whose Start it handles first)."""
    target, drafter, _ = models
    server = DraftServerThread(SlowDrafter(runner(drafter, max_num_seqs=8), confidence_threshold=0.0))
    pool = RemoteDrafterPool(lambda: [server.endpoint], target.config.vocab_size, deadline_s=0.02)
    try:
        pool.start(0, PROMPTS[1], make_params(max_tokens=64))
        pool.propose([DraftRequest(0, 2)])  # its Start: not awaited
        end = time.monotonic() + 10
        while not pool.remote[0].answered and time.monotonic() < end:
            time.sleep(0.01)
        pool.verdict(0, 0, 11)
        reqs = [DraftRequest(0, 2)]
        if attach_another:
            pool.start(1, PROMPTS[3], make_params(max_tokens=64))
            reqs.append(DraftRequest(1, 2))
        late = pool.propose(reqs)[0]  # 0.3 s of drafting against a 20 ms deadline
        assert late.tokens == []
        assert late.requested == (0 if attach_another else 2)
        assert pool.remote[0].misses == (0 if attach_another else 1)
    finally:
        pool.close()
        server.stop()


def test_prompt_lookup_in_the_pool_skips_the_round_trip_and_keeps_the_drafter_in_step(models):
    # the target drafts for itself: its drafts are all accepted only if the tokens kept from the
    # pool's own lookup drafts reached it in order
    target, _, want = models
    server = model_server(target)
    with over_the_wire(target, server, lookup_min_n=1) as (engine, pool):
        steps = []  # (draft from lookup, accepted, drafted) per verdict
        verdict = pool.verdict

        def recording_verdict(seq_id, accepted, next_token, path=None):
            steps.append((pool.remote[seq_id].looked_up, accepted, len(pool.seqs[seq_id].last_draft)))
            verdict(seq_id, accepted, next_token, path)

        pool.verdict = recording_verdict
        results = engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))
        assert [r.token_ids for r in results] == want
        model_steps = [(a, n) for looked_up, a, n in steps if not looked_up and n > 0]
        assert pool.lookup_drafts > 0 and any(looked_up for looked_up, _, _ in steps)
        assert model_steps and all(a == n for a, n in model_steps)
        assert server.worker.drafts_sent > 0


def lookup_and_fresh(engine: SpeculativeEngine, rtt_s: float) -> tuple[int, int]:
    """Two requests, one whose last token occurred before in it (a lookup draft) and one
    without; the cost model knows 10 ms verify steps of 1-3 positions and a round trip of `rtt_s`."""
    repeating = engine.add_request([5, 6, 7, 5, 6, 7, 5], make_params(max_tokens=8))
    fresh = engine.add_request(list(range(20, 34)), make_params(max_tokens=8))
    engine.cost.use_batch(2)
    for n in range(1, 4):
        engine.cost.observe_verify(n, 0.01)
    engine.cost.observe_rtt(rtt_s)
    return repeating, fresh


@pytest.mark.parametrize("rtt_s, asked", [(1.0, False), (0.0, True)], ids=["dear-round-trip", "free-round-trip"])
def test_beside_lookup_drafts_the_batch_waits_for_the_drafter_only_where_that_pays(models, rtt_s, asked):
    # one sequence drafts by lookup (its last token occurred before), the other needs the drafter:
    # with a 1 s round trip against 10 ms steps its drafts cannot pay, and it is not even attached
    target, drafter, _ = models
    server = model_server(drafter)
    engine, pool = lookup_engine(target, server, DraftLengthConfig(k_max=2, fixed_k=2))
    try:
        repeating, fresh = lookup_and_fresh(engine, rtt_s)
        engine.step()
        assert pool.remote[repeating].last_looked_up and pool.remote[repeating].link is None
        assert (pool.remote[fresh].link is not None) == asked
    finally:
        pool.close()
        server.stop()


def test_where_the_drafter_does_not_pay_the_pools_own_lookup_drafts_still_draft(models):
    # a 1 s round trip against 10 ms steps: drafting through the drafter is off for the batch,
    # but a lookup draft costs neither drafter time nor a round trip, so the repeating sequence
    # still drafts by lookup, the other takes a plain step, and the drafter is not even asked
    target, drafter, _ = models
    server = model_server(drafter)
    engine, pool = lookup_engine(target, server, DraftLengthConfig(k_max=2))
    try:
        repeating, fresh = lookup_and_fresh(engine, 1.0)
        engine.cost.observe_draft(1, 0.001, remote=True)
        assert engine._draft_lengths(list(engine.seqs.values())) == [2, 2] and engine._local_only
        engine.step()
        assert pool.remote[repeating].last_looked_up and pool.remote[repeating].link is None
        assert pool.remote[fresh].link is None and not engine._probing
        assert engine.timing.draft_steps == 1 and pool.lookup_drafts == 1
    finally:
        pool.close()
        server.stop()


def test_without_lookup_in_the_pool_a_drafter_that_does_not_pay_turns_drafting_off(models):
    # nothing can draft without a round trip, so the policy's answer is plain steps, not "local
    # drafts only" (which would be plain steps counted as drafting ones)
    target, drafter, _ = models
    server = model_server(drafter)
    engine, pool = lookup_engine(target, server, DraftLengthConfig(k_max=2), lookup_min_n=0)
    try:
        lookup_and_fresh(engine, 1.0)
        engine.cost.observe_draft(1, 0.001, remote=True)
        assert engine._draft_lengths(list(engine.seqs.values())) == [0, 0] and not engine._local_only
    finally:
        pool.close()
        server.stop()


def test_local_only_drafting_is_lossless_and_still_probes_the_drafter(models):
    # drafting through the drafter never pays, lookups do: the output stays the target's own,
    # lookup drafts are taken, and the drafter is still probed now and then (probe_every)
    from specserve.actors.engine.draft_length import CostModel

    class DearRoundTrip(CostModel):
        def step_time(self, k: int, local: bool = False) -> float:
            return 0.01 if k == 0 or local else 1.0

        def knows_plain(self) -> bool:
            return True

        def longest_measured(self) -> int:
            return 8

    target, drafter, want = models
    server = model_server(drafter)
    engine, pool = lookup_engine(target, server, DraftLengthConfig(k_max=3, probe_every=4, probe_max=4), DearRoundTrip)
    longest: list[int] = []
    after_propose(pool, lambda reqs, drafts: longest.append(max(len(d.tokens) for d in drafts)))
    try:
        results = engine.generate(PROMPTS, make_params(max_tokens=NEW_TOKENS))
        assert [r.token_ids for r in results] == want
        assert max(longest) > 1  # probes draft one token: longer drafts are the lookups' own
        assert pool.lookup_drafts > 0 and engine.timing.probes > 0
        assert server.worker.drafts_sent > 0  # probes only
    finally:
        pool.close()
        server.stop()


def test_a_probe_whose_remote_drafts_all_came_untimed_is_retried_until_one_measures_the_round_trip(models):
    # drafting never pays here, so only probes draft. The repeating sequence has a lookup draft
    # at the first probe; the other needs the drafter, and that probe first attaches it: its
    # draft comes back untimed (the drafter was prefilling). That probe measured no round trip,
    # so the next step probes again instead of waiting twice as long with the old estimate.
    from specserve.actors.engine.draft_length import CostModel

    class NeverPays(CostModel):
        def step_time(self, k: int, local: bool = False) -> float:
            return 1.0 if k == 0 else 100.0

    target, drafter, _ = models
    server = model_server(drafter)
    engine, pool = lookup_engine(target, server, DraftLengthConfig(k_max=2, probe_every=4, probe_max=64), NeverPays)
    probing: list[int] = []
    after_propose(pool, lambda reqs, drafts: probing.append(engine.timing.verify_steps))
    try:
        engine.add_request([5, 6, 7, 5, 6, 7, 5, 6, 7, 5], make_params(max_tokens=60, ignore_eos=True))
        engine.add_request(list(range(20, 34)), make_params(max_tokens=60, ignore_eos=True))
        for _ in range(40):
            engine.step()
        # the first probe only attached the second sequence: probed again on the next step (it
        # counted, and the next probe came 8 steps later, when the first sequence's lookup drafted)
        assert probing[:2] == [3, 4]
        assert engine.timing.probes >= 1 and len(probing) < 20  # probes that measured back off
    finally:
        pool.close()
        server.stop()


def test_a_request_drafts_from_traffic_served_elsewhere_with_no_round_trip(models):
    # another replica served PROMPTS[1]; a request that continues it drafts from those tokens
    # here (the pool's suffix index), nearly all accepted; its own tokens join the index after it
    target, drafter, want = models
    server = model_server(drafter)
    with over_the_wire(target, server, lookup_min_n=1) as (engine, pool):
        pool.add_finished(PROMPTS[1] + want[1])
        before = pool.lookup.store_tokens
        [res] = engine.generate([PROMPTS[1] + want[1][:4]], make_params(max_tokens=16))
        assert res.token_ids == want[1][4:20]
        assert pool.lookup_drafts >= 3 and res.stats.accepted >= 12
        assert pool.lookup.store_tokens == before + len(PROMPTS[1]) + 4 + 16  # its prompt and output
