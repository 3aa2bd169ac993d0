"""MergePolicy (torch-free): when an adapter should be merged, with a fake clock."""

from __future__ import annotations

from loraplex.server.config import MergeConfig
from loraplex.server.engine.merge_policy import MergePolicy


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def policy(**kw):
    clock = Clock()
    return MergePolicy(MergeConfig(**kw), clock), clock


def test_off_by_default_and_pinned_merges_only_when_alone():
    p, _ = policy()
    assert p.target({"a"}, None) is None
    p, _ = policy(adapter="a")
    assert p.target(set(), None) == "a"  # idle: merge now
    assert p.target({"a"}, None) == "a"
    assert p.target({"a", None}, "a") is None  # a base request needs the base weights
    assert p.target({"a", "b"}, "a") is None


def test_pinned_waits_a_window_after_a_switch_then_the_operator_overrides():
    p, clock = policy(adapter="a", window_s=10)
    p.switched()  # unmerged because someone else came
    assert p.target({"a"}, None) is None
    clock.now += 10
    assert p.target({"a"}, None) == "a"
    p.switched()
    p.pin("b")  # an operator's request takes effect at once
    assert p.target(set(), None) == "b"
    p.pin(None)
    assert p.target(set(), "b") is None


def test_auto_merges_a_hot_adapter_after_a_full_window_and_stays_while_alone():
    p, clock = policy(auto=True, threshold=0.9, window_s=10)
    for _ in range(9):
        clock.now += 1
        p.record({"a": 95, "b": 5})
    assert p.shares() == {"a": 0.95, "b": 0.05}
    assert p.target({"a"}, None) is None  # not a full window observed yet
    clock.now += 1
    p.record({"a": 95, "b": 5})
    assert p.target({"a"}, None) == "a"
    assert p.target({"a", "b"}, None) is None  # b is waiting: not now
    p.switched()
    clock.now += 100  # idle for long: a merged adapter stays merged
    assert p.target(set(), "a") == "a"


def test_auto_does_not_merge_below_the_threshold_and_hysteresis_bounds_switches():
    p, clock = policy(auto=True, threshold=0.9, window_s=10)
    for _ in range(20):
        clock.now += 1
        p.record({"a": 80, None: 20})
    assert p.target({"a"}, None) is None
    # Flapping traffic: every other second the base model asks; at most one merge and one
    # unmerge per window happen.
    p, clock = policy(auto=True, threshold=0.6, window_s=10)
    merged, switches = None, 0
    for t in range(100):
        clock.now += 1
        demand = {"a", None} if t % 2 else {"a"}
        p.record({"a": 90, None: 10})
        want = p.target(demand, merged)
        if want != merged:
            merged, switches = want, switches + 1
            p.switched()
    assert 0 < switches <= 2 * 100 / 10


def test_corrected_others_do_not_unmerge_a_pinned_adapter():
    p, _ = policy(adapter="a")
    assert p.target({"a", None, "b"}, None, corrected=True) == "a"  # merged beside them
    assert p.target({None, "b"}, "a", corrected=True) == "a"


def test_corrected_auto_merge_stays_while_its_share_holds_then_unmerges():
    p, clock = policy(auto=True, window_s=10, threshold=0.9, keep_share=0.5)
    clock.now += 10
    p.record({"a": 95, None: 5})
    assert p.target({"a", None}, None, corrected=True) == "a"  # others need no unmerge
    p.switched()  # merged
    assert p.target({"b"}, "a", corrected=True) == "a"  # no full window seen since
    clock.now += 5
    p.record({"a": 60, "b": 40})
    clock.now += 5
    assert p.target({"b"}, "a", corrected=True) == "a"  # 60% >= keep_share
    p.record({"b": 80})
    assert p.shares()["a"] < 0.5
    assert p.target({"a", "b"}, "a", corrected=True) is None  # below: unmerge
    assert p.target({"a", "b"}, "a", corrected=False) is None  # drained: b alone unmerges
