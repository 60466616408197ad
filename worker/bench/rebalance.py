"""``python -m worker bench --rebalance``: latency through scale events, in one sitting.

A fresh requests topic (``--partitions``, default 6) is served by two worker processes
(``python -m worker serve``, started as :func:`~worker.bench.targets.launch` starts every
bench target) under an open-loop ``--rate`` (:func:`~worker.bench.load.open_loop`). After a
steady window, four events follow, each ``--window`` seconds after the one before, or once
the group has settled again (every partition held by a live worker) if that takes longer:

1. ``join``: a third worker starts; the event is when it is up (its ``/metrics`` answers:
   models loaded, joining the group); its start-up before that is a window of its own;
2. ``leave``: the third worker gets SIGTERM (drain, commit, LeaveGroup);
3. ``static-restart``: worker 1, a static member (``WORKER_KAFKA__GROUP_INSTANCE_ID``), gets
   SIGTERM and is started again at once with the same id: back within its session timeout,
   the group should not rebalance;
4. ``kill``: worker 2 gets SIGKILL; its partitions wait for its session timeout.

Worker 1 starts first, so it leads the group (its restart is the leader's). The restart comes
before the kill so that another member is there to (not) rebalance; the kill leaves worker 1
alone. ``--static`` gives every worker its own static id (without it only worker 1 has one).
Static members get ``--static-session-timeout-ms`` (60 s, as deploy/k8s/static: a restart,
model load included, must fit in it); dynamic ones ``WORKER_KAFKA__SESSION_TIMEOUT_MS``. Each
window holds the requests *sent* in it; their latency is send to first reply, from the
timestamps the driver records (:attr:`~worker.bench.load.Load.timeline`); its duplicates are
the extra replies *read* in it (a kill's come after the session timeout, in the kill's window).
After the load stops, the run waits until every request is answered, the group has committed
everything and the reply topic is read to its end: then what was never answered is lost and
every further reply is a duplicate. Each worker's rebalance metrics are scraped from its
``/metrics`` before it is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from worker.bench.load import Load, open_loop, request_stream
from worker.bench.targets import bench_repository, bench_topics, delete_bench_topics, launch
from worker.errors import ConfigError, WorkerError
from worker.kafka import ensure_topics, security_config
from worker.settings import KafkaSettings, Settings

__all__ = ["DEFAULT_RATE", "EVENTS", "METRICS", "run_rebalance"]

DEFAULT_RATE = 300.0
"""Requests/s unless ``--rate`` says otherwise: well within what this 2-core machine holds."""
EVENTS = ("join", "leave", "static-restart", "kill")
WARMUP_S = 2.0
"""Load before the steady window starts (not reported in any window)."""
TAIL_S = 1.0
"""After the group settled, the next event waits this long (the stall's backlog drains)."""
METRICS = {
    "inference_rebalances_total": "rebalances",
    "inference_revoke_seconds_count": "revokes",
    "inference_revoke_seconds_sum": "revoke_seconds",
    "inference_abandoned_requests_total": "abandoned",
    "inference_partitions_assigned": "partitions",
}
"""Metrics scraped from each worker, and their names in the report."""


@dataclass
class Member:
    """One worker process of the run."""

    name: str
    instance_id: str | None
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    ended: str = "ran to the end"
    metrics: dict[str, float] = field(default_factory=dict)
    """The last scrape of its ``/metrics`` (before it was stopped)."""


class Group:
    """The worker processes of the run: started, scraped, signalled, watched until settled."""

    def __init__(self, kafka: KafkaSettings, repo: Path, logs: Path, args: argparse.Namespace):
        self.kafka, self.repo, self.logs, self.args = kafka, repo, logs, args
        self.members: list[Member] = []
        self.live: list[Member] = []

    def start(self, name: str, *, static: bool = False, again: Member | None = None) -> Member:
        """Start worker ``name``, a static member with its own id if ``static`` or ``--static``.

        ``again``: a new process of that member (its id, its log).
        """
        instance = f"{self.kafka.group_id}-{name}" if static or self.args.static else None
        instance = again.instance_id if again else instance
        env = {}
        if instance:
            env["WORKER_KAFKA__GROUP_INSTANCE_ID"] = instance
            env["WORKER_KAFKA__SESSION_TIMEOUT_MS"] = str(self.args.static_session_timeout_ms)
        log = again.log if again else self.logs / f"{name}.log"
        proc, port = launch("worker", self.kafka, self.repo, log,
                            worker_src=self.args.worker_src, env_over=env)  # fmt: skip
        member = Member(name, instance, proc, port, log)
        self.members.append(member)
        self.live.append(member)
        return member

    async def scrape(self, member: Member) -> dict[str, float] | None:
        """Its rebalance metrics now (kept as its last), or None if it does not answer."""
        import aiohttp  # noqa: PLC0415 - the bench extra
        from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

        url = f"http://127.0.0.1:{member.port}/metrics"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(url) as response,
            ):
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        found = {
            METRICS[s.name]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name in METRICS
        }
        member.metrics = found
        return found

    async def snapshot(self, *, without: Member | None = None) -> dict[str, dict[str, float]]:
        """Every live member's metrics (but ``without``'s), by name."""
        found = {m.name: await self.scrape(m) for m in self.live if m is not without}
        return {name: values for name, values in found.items() if values is not None}

    async def stop(self, member: Member, how: signal.Signals, ended: str) -> None:
        """Scrape ``member`` one last time, then send it ``how``."""
        await self.scrape(member)
        self.live.remove(member)
        member.ended = ended
        member.proc.send_signal(how)

    async def until_up(self, member: Member, timeout: float) -> float:
        """When ``member``'s ``/metrics`` first answers: its models are loaded, it is joining."""
        deadline = time.perf_counter() + timeout
        while await self.scrape(member) is None:
            if member.proc.poll() is not None or time.perf_counter() > deadline:
                raise _failed(member, f"did not start in {timeout:.0f}s")
            await asyncio.sleep(0.1)
        return time.perf_counter()

    async def until_settled(self, timeout: float) -> float | None:
        """When every partition is held by a live member (``perf_counter``); None on timeout."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            for member in self.live:
                if member.proc.poll() is not None:
                    raise _failed(member, "exited early")
            held = [await self.scrape(m) for m in self.live]
            counts = [int(h.get("partitions", 0)) if h else 0 for h in held]
            wanted = min(self.args.partitions, len(self.live))
            if sum(counts) == self.args.partitions and sum(c > 0 for c in counts) == wanted:
                return time.perf_counter()
            await asyncio.sleep(0.2)
        return None

    async def close(self) -> None:
        """Scrape and stop every member still running; wait for all to exit."""
        for member in list(self.live):
            await self.scrape(member)
            self.live.remove(member)
            member.proc.terminate()
        for member in self.members:
            try:
                await asyncio.to_thread(member.proc.wait, 60)
            except subprocess.TimeoutExpired:
                member.proc.kill()


def _failed(member: Member, what: str) -> WorkerError:
    tail = member.log.read_text(errors="replace")[-2000:]
    return WorkerError(f"bench: worker {member.name} {what}; the end of its log:\n{tail}")


@dataclass
class Window:
    """Requests sent between ``start`` and ``end`` (``perf_counter``), after event ``label``."""

    label: str
    start: float
    end: float
    event: dict[str, Any] = field(default_factory=dict)


async def run_rebalance(
    settings: Settings, args: argparse.Namespace, tmp: Path, say: Callable[[str], object] = print
) -> dict[str, Any]:
    """Run the scenario (the module's docstring), telling ``say`` what happens; the report."""
    if settings.kafka.group_instance_id:
        raise ConfigError("bench --rebalance: unset WORKER_KAFKA__GROUP_INSTANCE_ID; the bench "
                          "gives each worker its own (--static: every worker)")  # fmt: skip
    kafka = bench_topics(settings.kafka, "worker").model_copy(
        update={"topic_partitions": args.partitions}
    )
    repo = bench_repository(tmp / "repo", max_batch_size=args.max_batch_size,
                            delay_ms=args.max_batch_delay_ms, quantize=args.quantize,
                            only=args.model)  # fmt: skip
    group = Group(kafka, repo, tmp, args)
    session_ms = max(kafka.session_timeout_ms, args.static_session_timeout_ms)
    cap = (session_ms + kafka.rebalance_timeout_ms) / 1000 + 60
    load = Load(kafka, count_copies=True)
    sent: list[tuple[str, float]] = []
    windows: list[Window] = []
    try:
        await ensure_topics(kafka, [kafka.requests_topic, kafka.replies_topic])
        for name in ("w1", "w2"):  # one after the other: w1 leads the group
            say(f"starting {name}")
            group.start(name, static=name == "w1")
            if await group.until_settled(args.timeout) is None:
                raise WorkerError(f"bench: {name} got no partitions in {args.timeout}s")
        async with load.clients() as producer:

            async def send(rid: str, value: bytes) -> None:
                sent.append((rid, time.perf_counter()))
                load.expect(rid)
                await producer.send(kafka.requests_topic, value,
                                    headers=[("correlation_id", rid.encode())])  # fmt: skip

            stop = asyncio.Event()
            stream = request_stream(args.model, args.rows, f"rebalance-{kafka.group_id}")
            sender = asyncio.create_task(open_loop(stream, args.rate, send, stop=stop))
            say(f"warm-up at {args.rate:g} requests/s")
            try:
                await asyncio.sleep(WARMUP_S)
                windows = await _events(group, args, cap, say)
            finally:
                stop.set()
                await sender
            say("waiting for every reply, commit and duplicate")
            await _settle(load, kafka, {rid for rid, _ in sent}, args.timeout)
    finally:
        try:
            await group.close()
        finally:
            await delete_bench_topics(kafka)  # topics made before a failure included
    return _report(load, sent, windows, group)


async def _events(
    group: Group, args: argparse.Namespace, cap: float, say: Callable[[str], object]
) -> list[Window]:
    """The steady window, then each event and its window (the last one closed too)."""
    windows = [Window("steady", time.perf_counter(), 0.0)]
    say("steady window")
    settled: asyncio.Task[float | None] | None = None
    for name in (*EVENTS, ""):
        current = windows[-1]
        await asyncio.sleep(max(0.0, current.start + args.window - time.perf_counter()))
        if settled is not None:
            done = await settled
            current.event["settled_after_s"] = None if done is None else done - current.start
            if done is not None:
                await asyncio.sleep(max(0.0, done + TAIL_S - time.perf_counter()))
            before, after = current.event.pop("before"), await group.snapshot()
            current.event["others_rebalances"] = sum(
                int(after[n]["rebalances"] - before[n]["rebalances"]) for n in before if n in after
            )
        current.end = time.perf_counter()
        if not name:
            return windows
        say(f"{name} at {time.perf_counter() - windows[0].start:.1f} s")
        subject, before, at = await _act(group, name, windows, args.timeout)
        windows.append(Window(name, at, 0.0, {"worker": subject.name, "before": before}))
        settled = asyncio.create_task(group.until_settled(cap))
    return windows


async def _act(
    group: Group, name: str, windows: list[Window], timeout: float
) -> tuple[Member, dict[str, dict[str, float]], float]:
    """Make event ``name`` happen: its worker, the others' metrics just before, and when.

    A join happens when the new worker is up (models loaded, joining the group); its start-up
    before that is a window of its own (``starting``: what a starting worker costs the others).
    """
    w1, w2, *joined = group.members
    subject = {"leave": joined[0] if joined else None, "static-restart": w1, "kill": w2}.get(name)
    before = await group.snapshot(without=subject)
    at = time.perf_counter()
    if subject is None:
        subject = group.start("w3")
        windows.append(Window("starting", at, 0.0, {"worker": subject.name}))
        windows[-1].end = await group.until_up(subject, timeout)
        return subject, before, windows[-1].end
    if name == "leave":
        await group.stop(subject, signal.SIGTERM, "left (SIGTERM)")
    elif name == "kill":
        await group.stop(subject, signal.SIGKILL, "killed (SIGKILL)")
    else:  # the static member: stopped, then started again with the same id
        await group.stop(subject, signal.SIGTERM, "stopped (SIGTERM), restarted as w1'")
        await asyncio.to_thread(subject.proc.wait, 60)
        group.start("w1'", again=subject)
    return subject, before, at


async def _settle(load: Load, kafka: KafkaSettings, ids: set[str], timeout: float) -> None:
    """Wait for every reply, every offset committed and the reply topic read to its end."""
    deadline = time.perf_counter() + timeout
    answered = {rid for rid, _, _ in load.timeline}
    while not ids <= answered and time.perf_counter() < deadline:
        await asyncio.sleep(0.2)
        answered = {rid for rid, _, _ in load.timeline}
    consumer = load.consumer
    requests = [TopicPartition(kafka.requests_topic, p) for p in range(kafka.topic_partitions)]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers, **security_config(kafka))
    await admin.start()
    try:
        while time.perf_counter() < deadline:
            committed = await admin.list_consumer_group_offsets(kafka.group_id)
            ends = await consumer.end_offsets(requests)
            if all(tp in committed and committed[tp].offset >= end for tp, end in ends.items()):
                break
            await asyncio.sleep(0.2)
    finally:
        await admin.close()
    replies = list(consumer.assignment())
    ends = await consumer.end_offsets(replies)
    while time.perf_counter() < deadline:
        behind = [tp for tp, end in ends.items() if await consumer.position(tp) < end]
        if not behind:
            return
        await asyncio.sleep(0.1)


def _report(
    load: Load, sent: list[tuple[str, float]], windows: list[Window], group: Group
) -> dict[str, Any]:
    """Windows, events, workers and the ratios against the issue's targets, JSON-ready."""
    kafka, args = group.kafka, group.args
    copies: Counter[str] = load.copies or Counter()
    lost = [rid for rid, _ in sent if not copies.get(rid)]
    ours = {rid for rid, _ in sent}
    rows = []
    for window in windows:
        picks = [i for i, (_, at, _) in enumerate(load.timeline) if window.start <= at < window.end]
        ids = [rid for rid, at in sent if window.start <= at < window.end]
        seconds = window.end - window.start
        row = load.result(window.label, "open", len(ids), seconds, picks=picks).summary()
        row |= {
            "from_s": round(window.start - windows[0].start, 2),
            "duplicates": sum(window.start <= at < window.end for _, at in load.repeats),
            "lost": sum(not copies.get(rid) for rid in ids),
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in window.event.items()},
        }
        rows.append(row)
    by = {row["label"]: row for row in rows}
    restart = by["static-restart"].get("settled_after_s")
    static_session_s = args.static_session_timeout_ms / 1000
    steady = by["steady"]["p99_ms"]
    ratios = {
        "join_p99_minus_steady_ms": round(by["join"]["p99_ms"] - steady, 1),
        "leave_p99_minus_steady_ms": round(by["leave"]["p99_ms"] - steady, 1),
        "kill_stall_ms": by["kill"]["max_ms"],
        "static_restart_stall_ms": by["static-restart"]["max_ms"],
        "static_restart_rebalances_in_others": by["static-restart"].get("others_rebalances"),
        "static_restart_within_session_timeout": restart is not None and restart < static_session_s,
    }
    limits = {
        "target_p99_over_steady_ms": 300,
        "target_static_restart_rebalances_in_others": 0,
        "session_timeout_ms": kafka.session_timeout_ms,
        "static_session_timeout_ms": args.static_session_timeout_ms,
        "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "rebalance_timeout_ms": kafka.rebalance_timeout_ms,
        "partitions": args.partitions,
        "rate": args.rate,
        "model": args.model,
        "window_s": args.window,
        "static": bool(args.static),
    }
    workers = [
        {"name": m.name, "instance_id": m.instance_id, "ended": m.ended,
         **{k: None if v is None else round(v, 3) if k == "revoke_seconds" else int(v)
            for k, v in ((k, m.metrics.get(k)) for k in METRICS.values())}}
        for m in group.members
    ]  # fmt: skip
    return {
        "results": rows,
        "workers": workers,
        "lost": len(lost),
        "lost_ids": lost[:20],
        "duplicates": sum(c - 1 for rid, c in copies.items() if c > 1 and rid in ours),
        "ratios": ratios,
        "limits": limits,
    }
