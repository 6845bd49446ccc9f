"""The one memo type: expiry by the injected clock, LRU bound, forgetting."""

from __future__ import annotations

import pytest

from callerid.agent.memo import Memo
from tests.fakes import FakeClock


def test_a_value_lives_for_its_ttl() -> None:
    clock = FakeClock()
    memo: Memo[str, int] = Memo(max_entries=4, ttl_s=5.0, clock=clock)
    memo.put("a", 1)
    clock.advance(4.9)
    assert memo.get("a") == 1
    clock.advance(0.1)
    assert memo.get("a") is None
    assert memo.pop("a") is None  # an expired entry is dropped when looked at


def test_without_ttl_only_the_bound_forgets() -> None:
    clock = FakeClock()
    memo: Memo[int, str] = Memo(max_entries=3, ttl_s=None, clock=clock)
    for k in (1, 2, 3):
        memo.put(k, str(k))
    clock.advance(1e9)
    assert memo.get(1) == "1"  # used: now the most recent
    memo.put(4, "4")
    assert memo.get(2) is None  # 2 was the least recently used
    assert [memo.get(k) for k in (3, 1, 4)] == ["3", "1", "4"]


def test_put_many_remembers_all_at_one_time_and_keeps_the_bound() -> None:
    clock = FakeClock()
    memo: Memo[int, int] = Memo(max_entries=3, ttl_s=2.0, clock=clock)
    memo.put(9, 9)
    clock.advance(1.0)
    memo.put_many((k, k * 10) for k in (1, 2, 3))
    assert memo.get(9) is None  # pushed out by the bound
    clock.advance(1.9)
    assert [memo.get(k) for k in (1, 2, 3)] == [10, 20, 30]
    clock.advance(0.1)
    assert memo.get(1) is None


def test_pop_and_clear() -> None:
    memo: Memo[str, int] = Memo(max_entries=2, ttl_s=1.0, clock=FakeClock())
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.pop("a") == 1
    assert memo.pop("a") is None
    memo.clear()
    assert memo.get("b") is None


@pytest.mark.parametrize(("max_entries", "ttl_s"), [(0, 1.0), (1, -1.0), (1, float("nan"))])
def test_bad_bounds_are_refused(max_entries: int, ttl_s: float) -> None:
    with pytest.raises(ValueError, match="must be"):
        Memo(max_entries=max_entries, ttl_s=ttl_s, clock=FakeClock())


def test_an_owning_memo_drops_each_value_it_lets_go_once() -> None:
    """``on_drop`` gets what expires (when asked for, or swept), is replaced, evicted or
    cleared; not what `pop` hands back, nor a value put again for its own key."""
    clock, dropped = FakeClock(), []
    memo: Memo[str, str] = Memo(max_entries=2, ttl_s=10.0, clock=clock, on_drop=dropped.append)
    memo.put("a", "A")
    memo.put("a", "A")  # the same value again: still held
    memo.put("a", "A2")  # replaced
    assert dropped == ["A"]
    memo.put("b", "B")
    memo.put("c", "C")  # beyond the bound: the least recently used goes
    assert dropped == ["A", "A2"] and len(memo) == 2
    assert memo.pop("b") == "B" and dropped == ["A", "A2"]
    clock.advance(10.0)
    memo.sweep()
    assert dropped == ["A", "A2", "C"] and len(memo) == 0
    memo.put("d", "D")
    clock.advance(10.0)
    assert memo.get("d") is None and dropped[-1] == "D"
    memo.put("e", "E")
    memo.clear()
    assert dropped[-1] == "E" and len(memo) == 0


def test_with_no_ttl_nothing_is_kept_and_each_value_is_let_go_at_once() -> None:
    dropped: list[int] = []
    memo: Memo[str, int] = Memo(max_entries=4, ttl_s=0.0, clock=FakeClock(), on_drop=dropped.append)
    memo.put("a", 1)
    memo.put_many([("b", 2), ("c", 3)])
    assert dropped == [1, 2, 3]
    assert len(memo) == 0 and memo.get("a") is None
