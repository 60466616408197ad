"""Priority classes without Kafka: choosing a class, the aged order, the batcher, the reserve."""

from __future__ import annotations

import asyncio
import itertools
import threading

import numpy as np
import pytest
from aiokafka import TopicPartition
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.batching import Batcher
from worker.errors import ErrorCode, RequestError
from worker.inflight import InFlight
from worker.priority import Priority, choose
from worker.waiting import Entry, Waiting

HIGH, NORMAL, LOW = Priority.HIGH, Priority.NORMAL, Priority.LOW


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"high", HIGH), (b"Normal", NORMAL), (b" LOW ", LOW), (b"1", HIGH), (b"3", LOW),
     (b"0", NORMAL)],
)  # fmt: skip
def test_a_header_names_a_class_by_name_or_number(value: bytes, expected: Priority) -> None:
    """Names in any case and Triton's numbers choose a class; 0 is the origin's default."""
    assert choose([("priority", value)], None, NORMAL) == expected


def test_the_header_wins_over_the_parameter_and_the_default_applies_without_either() -> None:
    """Header first, then the ``priority`` parameter, then the origin's default."""
    assert choose([("priority", b"low")], {"priority": "high"}, NORMAL) == LOW
    assert choose([], {"priority": "low"}, HIGH) == LOW
    assert choose([], {"priority": 1}, LOW) == HIGH
    assert choose([], {"priority": 0}, HIGH) == HIGH
    assert choose([], {"other": "x"}, HIGH) == HIGH
    assert choose([("traceparent", b"x")], None, LOW) == LOW


@pytest.mark.parametrize(
    "value", ["urgent", "4", "-1", "", "highest", "1.0", "\u00b2", "\uff11", "\u0663"]
)
def test_a_value_outside_the_set_is_refused_naming_the_accepted_values(value: str) -> None:
    """INVALID_ARGUMENT that lists high, normal, low: a typo never silently demotes."""
    with pytest.raises(RequestError) as caught:
        choose([], {"priority": value}, NORMAL)
    assert caught.value.code == ErrorCode.INVALID_ARGUMENT
    assert "high, normal, low" in caught.value.message


@pytest.mark.parametrize("value", [True, 2.0, 4, -3, 10**30])
def test_a_parameter_that_is_not_a_class_number_is_refused(value: object) -> None:
    """Booleans, floats and numbers outside 0-3 are refused, not coerced."""
    with pytest.raises(RequestError):
        choose([], {"priority": value}, NORMAL)  # type: ignore[dict-item]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_header_bytes_give_a_class_or_a_short_coded_error(value: bytes) -> None:
    """Hostile header bytes: a class, or INVALID_ARGUMENT whose message stays short."""
    try:
        chosen: Priority | RequestError = choose([("priority", value)], None, NORMAL)
    except RequestError as exc:
        chosen = exc
    if isinstance(chosen, RequestError):
        assert chosen.code == ErrorCode.INVALID_ARGUMENT
        assert len(chosen.message) < 300
    else:
        assert chosen in Priority


def test_a_megabyte_header_is_refused_without_being_echoed() -> None:
    """A huge header value is refused and cut in the message."""
    with pytest.raises(RequestError) as caught:
        choose([("priority", b"h" * 1_000_000)], None, NORMAL)
    assert len(caught.value.message) < 300


def aged(entry: Entry[int], aging: float) -> tuple[float, int]:
    """The order key the module promises: aged arrival, then class."""
    return entry.at + entry.rank * aging, entry.rank


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.floats(0, 5), st.integers(0, 2)), min_size=1, max_size=80),
    st.sampled_from([0.0, 0.5, 2.0, 1000.0]),
)
def test_every_take_is_the_earliest_aged_arrival_among_those_waiting(
    ops: list[tuple[bool, float, int]], aging: float
) -> None:
    """Interleaved puts and takes: each take has the least (at + rank x aging) waiting."""
    waiting: Waiting[int] = Waiting(3, aging)
    now = 0.0
    present: list[Entry[int]] = []
    numbers = itertools.count()
    for take, step, rank in ops:
        now += step
        if take and present:
            entry = waiting.popleft()
            assert aged(entry, aging) == min(aged(e, aging) for e in present)
            present.remove(entry)
        else:
            entry = Entry(now, next(numbers), 1, 1, rank)
            waiting.append(entry)
            present.append(entry)
        assert len(waiting) == len(present)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.floats(0, 3), st.integers(0, 2)), min_size=2, max_size=60),
    st.sampled_from([0.1, 1.0, 5.0]),
)
def test_no_request_is_overtaken_by_one_that_came_more_than_its_aging_later(
    arrivals: list[tuple[float, int]], aging: float
) -> None:
    """The starvation bound: x goes before any y with y.at > x.at + (x.rank - y.rank) x aging."""
    waiting: Waiting[int] = Waiting(3, aging)
    now = 0.0
    for number, (step, rank) in enumerate(arrivals):
        now += step
        waiting.append(Entry(now, number, 1, 1, rank))
    order = [waiting.popleft() for _ in range(len(arrivals))]
    for i, x in enumerate(order):
        for y in order[:i]:  # y went first
            assert y.at <= x.at + (x.rank - y.rank) * aging, (x, y)


def test_give_back_and_withdraw_keep_each_class_in_arrival_order() -> None:
    """Entries given back return to their class's front; a withdrawal keeps the rest in order."""
    waiting: Waiting[int] = Waiting(3, 10.0)
    for i, rank in enumerate([2, 0, 1, 0, 2]):
        waiting.append(Entry(float(i), i, 1, 1, rank))
    taken = [waiting.popleft() for _ in range(3)]
    assert [e.item for e in taken] == [1, 3, 2]
    waiting.give_back(taken)
    assert waiting.withdraw(lambda item: item == 3)[0].item == 3
    assert [waiting.popleft().item for _ in range(len(waiting))] == [1, 2, 0, 4]


def test_a_rank_outside_the_classes_joins_the_last_class() -> None:
    """A classifier's bad rank is clamped: never a new queue."""
    waiting: Waiting[int] = Waiting(2, 1.0)
    waiting.append(Entry(0.0, 1, 1, 1, 99))
    waiting.append(Entry(0.0, 2, 1, 1, -5))
    assert [waiting.popleft().rank for _ in range(2)] == [0, 1]


async def test_a_batch_is_filled_from_the_highest_class_first() -> None:
    """Queued low, normal, high items: batches take high, then normal, then low."""
    batches: list[list[tuple[str, int]]] = []

    async def process(run: list[list[tuple[str, int]]]) -> None:
        batches.extend(run)

    ranks = {"high": 0, "normal": 1, "low": 2}
    batcher: Batcher[tuple[str, int]] = Batcher(
        process, max_batch_size=3, max_batch_delay=60, classify=lambda item: ranks[item[0]],
        classes=3, aging=60.0,
    )  # fmt: skip
    for i in range(3):
        batcher.put(("low", i))
    for i in range(2):
        batcher.put(("normal", i))
    batcher.put(("high", 0))
    batcher.close()
    await asyncio.wait_for(batcher.run(), 5)
    assert batches == [[("high", 0), ("normal", 0), ("normal", 1)], [("low", 0), ("low", 1),
                                                                      ("low", 2)]]  # fmt: skip


async def test_a_low_item_that_aged_past_the_bound_goes_before_fresh_high_items() -> None:
    """Aging: a low item older than 2 x aging is taken before high items that came later."""
    now = [0.0]
    batches: list[list[str]] = []

    async def process(run: list[list[str]]) -> None:
        batches.extend(run)

    batcher: Batcher[str] = Batcher(
        process, max_batch_size=1, max_batch_delay=0, classify=lambda item: 2 * (item == "low"),
        classes=3, aging=1.0, clock=lambda: now[0],
    )  # fmt: skip
    batcher.put("low")
    now[0] = 2.5  # more than 2 x aging later
    batcher.put("high")
    batcher.close()
    await asyncio.wait_for(batcher.run(), 5)
    assert batches == [["low"], ["high"]]


async def test_a_measured_batch_takes_the_highest_class_first() -> None:
    """Text (measured, sorted by length): the first batch holds the high item."""
    batches: list[list[tuple[int, int]]] = []

    async def process(run: list[list[tuple[int, int]]]) -> None:
        batches.extend(run)

    batcher: Batcher[tuple[int, int]] = Batcher(
        process, max_batch_size=2, max_batch_delay=60, measure=lambda item: (1, item[1]),
        sort_window=4, classify=lambda item: item[0], classes=3, aging=60.0,
    )  # fmt: skip
    for length in (5, 6, 7, 8):
        batcher.put((1, length))
    batcher.put((0, 100))
    batcher.close()
    await asyncio.wait_for(batcher.run(), 5)
    assert (0, 100) in batches[0]
    assert sorted(item for batch in batches for item in batch) == sorted(
        [(1, 5), (1, 6), (1, 7), (1, 8), (0, 100)]
    )


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 500), st.floats(0, 0.99), st.integers(0, 600), st.integers(0, 600))
def test_records_never_take_the_calls_reserve(
    limit: int, share: float, records: int, calls: int
) -> None:
    """Records get at most limit - reserve places (fewer while calls use more); calls any free."""
    bound = InFlight.reserving(limit, share)
    assert 0 <= bound.reserved < limit
    bound.calls = calls
    for offset in range(records):
        bound.records.track(TopicPartition("requests", 0), offset)
    assert bound.room() == limit - records - calls
    assert bound.room_for_records() <= limit - bound.reserved - records
    assert bound.room_for_records() <= bound.room()
    if calls <= bound.reserved:
        assert bound.room_for_records() == limit - bound.reserved - records


def test_a_reserve_always_leaves_records_a_place() -> None:
    """However small the bound, records keep one place; an impossible reserve is refused."""
    assert InFlight.reserving(1, 0.9).reserved == 0
    assert InFlight.reserving(10, 0.95).reserved == 9
    with pytest.raises(ValueError, match="records need a place"):
        InFlight(5, 5)


async def test_a_high_item_sets_urgent_and_what_a_run_hands_back_runs_next_in_order() -> None:
    """Preemption: a run hands back its unrun batches; the high item goes, then them, in order."""
    urgent = threading.Event()
    seen: list[list[int]] = []
    first_run = asyncio.Event()
    release = asyncio.Event()

    async def process(run: list[list[int]]) -> list[int]:
        seen.append([item for batch in run for item in batch])
        if len(seen) == 1:
            first_run.set()
            await release.wait()
            assert urgent.is_set(), "a high item came while this run was processed"
            return [item for batch in run[1:] for item in batch]  # only the first batch ran
        return []

    batcher: Batcher[int] = Batcher(
        process, max_batch_size=2, max_batch_delay=0, max_batches_per_run=4,
        classify=lambda item: 0 if item >= 100 else 1, classes=3, aging=60.0, urgent=urgent,
    )  # fmt: skip
    async with asyncio.TaskGroup() as group:
        for i in range(8):
            batcher.put(i)
        group.create_task(batcher.run())
        await asyncio.wait_for(first_run.wait(), 5)
        assert not urgent.is_set()
        batcher.put(100)
        release.set()
        batcher.close()
    assert seen[0] == list(range(8))
    assert seen[1][0] == 100, "the high item runs first (its run alone)"
    assert [item for run in seen[1:] for item in run] == [100, 2, 3, 4, 5, 6, 7]


def test_a_run_stops_at_a_batch_boundary_once_stop_is_set() -> None:
    """run_batches: stop set, the batch under way finishes and no later batch is staged."""
    import torch  # noqa: PLC0415

    from tests.test_device import sized_model  # noqa: PLC0415
    from worker.forward import run_batches  # noqa: PLC0415
    from worker.prepared import Prepared  # noqa: PLC0415

    class Doubling(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    model = sized_model(Doubling())
    rows = [Prepared([np.full((1, 2), float(i), np.float32)], rows=1) for i in range(6)]
    batches = [rows[0:2], rows[2:4], rows[4:6]]
    stop = threading.Event()
    assert len(run_batches(model, batches, stop)) == 3, "not set: every batch"
    stop.set()
    stopped = run_batches(model, batches, stop)
    assert len(stopped) == 1
    outputs = stopped[0][2]
    assert not isinstance(outputs[1], Exception)
    assert outputs[1][0].to_numpy().tolist() == [[2.0, 2.0]], "its own rows, doubled"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.integers(), st.floats(), st.booleans()))
def test_any_parameter_value_gives_a_class_or_invalid_argument(value: object) -> None:
    """Hostile parameters (Unicode digits included): a class, or INVALID_ARGUMENT; never a crash."""
    try:
        chosen: Priority | RequestError = choose([], {"priority": value}, NORMAL)  # type: ignore[dict-item]
    except RequestError as exc:
        chosen = exc
    if isinstance(chosen, RequestError):
        assert chosen.code == ErrorCode.INVALID_ARGUMENT
    else:
        assert chosen in Priority


def test_records_of_a_fetch_being_handed_on_count_in_flight() -> None:
    """A fetch handed on in chunks: its records not yet handed on leave calls no room."""
    bound = InFlight.reserving(1000, 0.1)
    bound.incoming = 500
    assert bound.room() == 500
    assert bound.room_for_records() == 400
