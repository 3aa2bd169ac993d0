"""Scheduler, block manager and slot table: plain Python, no model."""

import pytest
from loraplex.adapters.slot_table import SlotTable
from loraplex.server.config import SchedulerConfig
from loraplex.server.engine.block_manager import BlockManager
from loraplex.server.engine.request import Request, RequestError, RequestStatus, SamplingParams
from loraplex.server.engine.scheduler import Scheduler


def make_request(rid, prompt_len, adapter=None, max_tokens=8):
    return Request(str(rid), list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens),
                   adapter)


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_seqs=8, slots=4,
                   max_overtakes=SchedulerConfig.max_overtakes):
    loads = []
    table = SlotTable(slots, lambda name, slot: loads.append((name, slot)))
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget,
                                      max_overtakes=max_overtakes),
                      BlockManager(num_blocks, block_size), table)
    return sched, table, loads


def run_step(sched, sample_token=7):
    """What the engine does after a forward: advance, then append a token where sampled."""
    out = sched.schedule()
    sched.advance(out)
    for s in out.scheduled:
        if s.samples:
            s.request.output_token_ids.append(sample_token)
    return out


def plan(out):
    return [(s.request.request_id, s.num_new_tokens, s.samples) for s in out.scheduled]


class TestBlockManager:
    @pytest.mark.parametrize("computed,new,held,needed", [
        (0, 1, 0, 1), (0, 4, 0, 1), (0, 5, 0, 2), (3, 1, 1, 0), (4, 1, 1, 1), (0, 0, 0, 0),
    ])
    def test_blocks_needed(self, computed, new, held, needed):
        bm = BlockManager(8, 4)
        r = make_request(0, 10)
        r.num_computed_tokens = computed
        r.block_ids = list(range(held))
        assert bm.num_blocks_needed(r, new) == needed

    def test_allocate_and_free_round_trip(self):
        bm = BlockManager(4, 4)
        a, b = make_request("a", 9), make_request("b", 4)
        bm.allocate(a, 9)
        assert len(a.block_ids) == 3 and bm.num_free_blocks == 1
        assert not bm.can_allocate(b, 5) and bm.can_allocate(b, 4)
        bm.allocate(b, 4)
        assert bm.usage == 1.0
        bm.free(a)
        assert a.block_ids == [] and bm.num_free_blocks == 3
        assert len(set(b.block_ids) | set(range(4))) == 4


class TestSlotTable:
    def test_lru_eviction_skips_busy_slots(self):
        loads = []
        t = SlotTable(2, lambda n, s: loads.append((n, s)))
        assert t.acquire("a") == 0 and t.acquire("b") == 1
        t.release("a")
        t.release("b")
        t.acquire("a")  # a is now most recent; b is evicted next
        t.release("a")
        assert t.acquire("c") == 1 and t.slot_of("b") is None
        assert t.loaded == ["a", "c"]
        assert loads == [("a", 0), ("b", 1), ("c", 1)]

    def test_all_slots_busy(self):
        t = SlotTable(1, lambda n, s: None)
        assert t.acquire("a") == 0
        assert t.acquire("b") is None
        assert t.acquire("a") == 0  # a second user of a resident adapter is fine
        t.release("a")
        assert t.acquire("b") is None  # still one user
        t.release("a")
        assert t.acquire("b") == 0

    def test_evict_refuses_busy(self):
        t = SlotTable(1, lambda n, s: None)
        t.acquire("a")
        assert not t.evict("a") and not t.evict("zzz")
        t.release("a")
        assert t.evict("a") and t.slot_of("a") is None


class TestScheduler:
    def test_empty(self):
        sched, *_ = make_scheduler()
        assert sched.schedule().empty and not sched.has_unfinished()

    def test_chunked_prefill_under_budget(self):
        sched, *_ = make_scheduler(budget=8)
        sched.add(make_request("a", 20))
        assert plan(run_step(sched)) == [("a", 8, False)]
        assert plan(run_step(sched)) == [("a", 8, False)]
        assert plan(run_step(sched)) == [("a", 4, True)]  # last chunk samples
        assert plan(run_step(sched)) == [("a", 1, True)]  # then decodes

    def test_decodes_first_then_prefill_chunks(self):
        sched, *_ = make_scheduler(budget=10)
        sched.add(make_request("a", 3))
        run_step(sched)
        sched.add(make_request("b", 30))
        sched.add(make_request("c", 2))
        # a decodes (1), b takes the remaining 9 as a chunk; c must wait for budget.
        assert plan(run_step(sched)) == [("a", 1, True), ("b", 9, False)]
        # Running b continues before waiting c is admitted.
        assert plan(run_step(sched)) == [("a", 1, True), ("b", 9, False)]

    def test_token_budget_is_never_exceeded(self):
        sched, *_ = make_scheduler(budget=16, num_blocks=256)
        for i in range(10):
            sched.add(make_request(i, 3 + 5 * i))
        for _ in range(40):
            out = run_step(sched)
            assert out.num_batched_tokens <= 16
            for s in out.scheduled:
                if s.request.num_output_tokens >= 3:
                    sched.finish(s.request, RequestStatus.FINISHED_LENGTH)
        assert not sched.has_unfinished()

    def test_max_num_seqs(self):
        sched, *_ = make_scheduler(max_seqs=2)
        for i in range(4):
            sched.add(make_request(i, 2))
        assert [r for r, *_ in plan(run_step(sched))] == ["0", "1"]
        assert sched.num_running == 2 and sched.num_waiting == 2

    def test_preempts_newest_and_recomputes(self):
        # 4 blocks of 4 tokens: a and b each hold 2 blocks after prefill of 8 tokens.
        sched, *_ = make_scheduler(num_blocks=4, block_size=4, budget=32)
        a, b = make_request("a", 7), make_request("b", 7)
        sched.add(a)
        sched.add(b)
        run_step(sched)  # both prefilled (7 tokens + 1 sampled = 8 = 2 blocks each)
        out = run_step(sched)  # both decode token 8 -> still inside block 2
        assert plan(out) == [("a", 1, True), ("b", 1, True)]
        out = run_step(sched)  # token 9 needs a third block: b (newest) is preempted
        assert out.preempted == [b] and plan(out) == [("a", 1, True)]
        assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0
        assert b.block_ids == [] and b.num_preemptions == 1 and sched.waiting[0] is b
        assert b.num_output_tokens == 2  # its output so far is kept and recomputed
        sched.finish(a, RequestStatus.FINISHED_STOPPED)
        out = run_step(sched)
        assert plan(out) == [("b", 9, True)]  # prompt + both outputs, then samples again

    def test_lone_request_preempts_itself_when_cache_is_full(self):
        sched, *_ = make_scheduler(num_blocks=1, block_size=4, budget=64)
        a = make_request("a", 3)
        sched.add(a)
        run_step(sched)  # prompt: 3 tokens computed, one sampled
        run_step(sched)  # the 4th fills the only block
        out = run_step(sched)  # the 5th does not fit anywhere
        assert out.preempted == [a] and out.empty
        assert sched.waiting[0] is a

    def test_no_admission_in_a_step_that_preempted(self):
        sched, *_ = make_scheduler(num_blocks=3, block_size=4, budget=64)
        a, b, c = make_request("a", 3), make_request("b", 3), make_request("c", 1)
        sched.add(a)
        sched.add(b)
        run_step(sched)  # one block each, one free
        run_step(sched)  # both fill their block
        sched.add(c)
        out = run_step(sched)  # a takes the free block; b finds none and yields its own
        assert out.preempted == [b] and plan(out) == [("a", 1, True)]
        # A block is free again, but a step that preempted admits nobody.
        assert sched.blocks.num_free_blocks == 1 and list(sched.waiting) == [b, c]

    def test_abort_waiting_and_running(self):
        sched, table, _ = make_scheduler()
        a, b = make_request("a", 3, adapter="x"), make_request("b", 3)
        sched.add(a)
        run_step(sched)
        sched.add(b)
        assert table.refs("x") == 1
        assert sched.abort("a") is a and a.status is RequestStatus.FINISHED_ABORTED
        assert a.block_ids == [] and table.refs("x") == 0
        assert sched.abort("b") is b and not sched.has_unfinished()
        assert sched.abort("b") is None and sched.abort("nope") is None
        assert sched.blocks.num_free_blocks == sched.blocks.num_blocks

    def test_adapter_slots_gate_admission_in_order_when_nobody_may_overtake(self):
        sched, _, loads = make_scheduler(slots=1, max_overtakes=0)
        sched.add(make_request("a", 2, adapter="x"))
        sched.add(make_request("b", 2, adapter="y"))
        sched.add(make_request("c", 2, adapter="x"))
        out = run_step(sched)
        # y cannot get a slot while x is busy; c must not overtake b (first come, first served).
        assert plan(out) == [("a", 2, True)] and loads == [("x", 0)]
        sched.finish(sched.running[0], RequestStatus.FINISHED_STOPPED)
        out = run_step(sched)
        assert [s.request.request_id for s in out.scheduled] == ["b"]
        assert loads == [("x", 0), ("y", 0)]

    def test_resident_and_base_requests_pass_one_waiting_for_a_slot(self):
        sched, table, loads = make_scheduler(slots=1)
        for rid, adapter in [("a", "x"), ("b", "y"), ("c", "x"), ("d", None), ("e", "z")]:
            sched.add(make_request(rid, 2, adapter=adapter))
        out = run_step(sched)
        # b waits for the only slot; c (x is resident) and d (base model) go ahead of it, but
        # e, which would need a slot too, stays behind b.
        assert [s.request.request_id for s in out.scheduled] == ["a", "c", "d"]
        assert [r.request_id for r in sched.waiting] == ["b", "e"]
        b, e = sched.waiting
        assert b.num_overtaken == 2 and e.num_overtaken == 0
        for r in [r for r in sched.running if r.adapter == "x"]:
            sched.finish(r, RequestStatus.FINISHED_STOPPED)
        out = run_step(sched)
        assert [s.request.request_id for s in out.scheduled if s.request.adapter] == ["b"]
        assert loads == [("x", 0), ("y", 0)] and table.refs("y") == 1
        assert [r.request_id for r in sched.waiting] == ["e"]

    def test_a_request_is_passed_over_at_most_max_overtakes_times(self):
        sched, _, loads = make_scheduler(slots=1, max_overtakes=2)
        for rid, adapter in [("a", "x"), ("b", "y"), ("c", "x"), ("d", None), ("e", "x")]:
            sched.add(make_request(rid, 2, adapter=adapter, max_tokens=4))
        out = run_step(sched)
        assert [s.request.request_id for s in out.scheduled] == ["a", "c", "d"]
        # b has been passed twice: e, though its adapter is resident, waits behind it now
        for _ in range(2):
            out = run_step(sched)
            assert {s.request.request_id for s in out.scheduled} == {"a", "c", "d"}
        assert [r.request_id for r in sched.waiting] == ["b", "e"]
        assert [r.num_overtaken for r in sched.waiting] == [2, 0]
        for r in [r for r in sched.running if r.adapter == "x"]:
            sched.finish(r, RequestStatus.FINISHED_STOPPED)
        out = run_step(sched)
        # the slot is free: b takes it (x leaves), and e now needs a slot itself
        assert [s.request.request_id for s in out.scheduled] == ["d", "b"]
        assert loads == [("x", 0), ("y", 0)] and [r.request_id for r in sched.waiting] == ["e"]

    def test_preemption_releases_adapter_slot(self):
        sched, table, _ = make_scheduler(num_blocks=1, block_size=4)
        a = make_request("a", 3, adapter="x")
        sched.add(a)
        run_step(sched)
        assert table.refs("x") == 1
        run_step(sched)
        run_step(sched)  # preempts itself
        assert table.refs("x") == 0 and a.lora_slot == -1


class TestSamplingParams:
    @pytest.mark.parametrize("kwargs,param", [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": ("",)}, "stop"),
        ({"stop_token_ids": (-1,)}, "stop_token_ids"),
        ({"logprobs": 21}, "logprobs"),
    ])
    def test_invalid(self, kwargs, param):
        with pytest.raises(RequestError) as e:
            SamplingParams(**kwargs)
        assert e.value.param == param


class TestHostCache:
    def test_lru_put_get_drop(self):
        from loraplex.adapters.registry import HostCache

        cache = HostCache(2)
        assert cache.put("a", 1) == [] and cache.put("b", 2) == []
        assert cache.get("a") == 1  # a is now the most recent
        assert cache.put("c", 3) == ["b"]
        assert "b" not in cache and cache.get("b") is None and len(cache) == 2
        assert cache.put("a", 10) == [] and cache.get("a") == 10  # refresh, no eviction
        cache.drop("a")
        cache.drop("zzz")
        assert len(cache) == 1 and "c" in cache


def test_a_gate_holds_requests_in_place_and_lets_others_pass():
    """While an adapter is merged only its requests are admitted (Scheduler.admits); the
    others keep their places in the queue and start once the gate opens."""
    slots = SlotTable(4, lambda name, slot: None)
    blocks = BlockManager(64, 4)
    gate = {"open": False}
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64), blocks, slots,
                      admits=lambda r: gate["open"] or r.adapter == "m")
    reqs = [Request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=2), a)
            for i, a in enumerate([None, "m", "x", "m"])]
    for r in reqs:
        sched.add(r)
    out = sched.schedule()
    assert [s.request.request_id for s in out.scheduled] == ["r1", "r3"]
    assert [r.request_id for r in sched.waiting] == ["r0", "r2"]
    assert all(r.num_overtaken == 0 for r in reqs)  # held, not passed over for a slot
    gate["open"] = True
    out = sched.schedule()
    assert {s.request.request_id for s in out.scheduled} >= {"r0", "r2"}
