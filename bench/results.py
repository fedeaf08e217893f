"""What one benchmark run found: plain records, written to results.json as they are."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Round:
    """One server's slice of a cell in one round: the figures that show how steady the rounds were."""

    round: int  # 1, 2, ...
    position: int  # its place in the round's order: 1 is first
    poems: int
    seconds: float
    poems_per_s: float
    cpu_us_per_poem: float
    p99_us: float
    others_pct: float
    steal_pct: float
    #: Measured this many times, other work having shared the cores; this
    #: is the quietest attempt.
    attempts: int = 1
    #: Every system call of the server over its poems, in this round's
    #: counting slice (see SyscallCount); None if not counted.
    syscalls_per_poem: float | None = None


@dataclass
class SyscallCount:
    """A server's system calls under load, counted by perf in a slice of their own.

    perf's counting slows every system call it counts, which would show in
    the server's CPU time; so calls are counted in a short slice of load
    right after the slice that measures the CPU (same server, same
    clients, same round), and that slice's time and CPU count for nothing.
    """

    server: str
    concurrency: int
    poems: int
    failures: int
    failure_reasons: dict[str, int]
    #: By call, syscalls.ALL being every call; empty if perf gave nothing.
    counts: dict[str, int] = field(default_factory=dict)
    #: Why perf gave no count, if it did not.
    error: str = ""

    def per_poem(self, name: str) -> float | None:
        """Calls of ``name`` over the poems, or None if not counted."""
        if name not in self.counts or not self.poems:
            return None
        return self.counts[name] / self.poems


@dataclass
class Cell:
    """One server under one load at one concurrency: closed-loop runs, the sum of its rounds.

    The servers of a section take turns under load, in rounds; a cell adds
    up its server's slices (see measure.merge), and ``rounds`` keeps each
    slice's own figures.
    """

    server: str
    concurrency: int
    poem_bytes: int
    #: Server processes on their core(s) ("0", or "0,1" with workers).
    server_cores: str
    poems: int  # whole poems received
    failures: int
    failure_reasons: dict[str, int]
    seconds: float
    poems_per_s: float
    mb_per_s: float  # poem bytes received, 10^6 bytes a second
    mean_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    #: CPU time of the server's process tree during the run (schedstat).
    server_cpu_s: float
    cpu_us_per_poem: float
    #: How busy each core was during the run (/proc/stat: user, system,
    #: irq, softirq).
    server_core_busy_pct: float
    loadgen_core_busy_pct: float
    #: Time the hypervisor gave to other guests while ours had work to do
    #: (/proc/stat's steal), as a share of both cores' time.
    steal_pct: float
    #: Busy time on those cores that was neither the server's nor the load
    #: generator's (other processes, ksoftirqd), as a share of them.
    others_pct: float
    loadgen_cpu_s: float
    #: VmRSS of the server's processes after the run, and how many there were.
    rss_kib: int
    processes: int
    #: Slices measured, counting those measured again because other work
    #: shared the cores (more than len(rounds) if any was).
    attempts: int = 1
    rounds: list[Round] = field(default_factory=list)
    #: System calls of the server's process tree, by call (syscalls.ALL:
    #: every call), added up over the rounds' counting slices, and the
    #: poems served in those slices; empty if none were counted.
    syscalls: dict[str, int] = field(default_factory=dict)
    syscall_poems: int = 0
    #: syscalls[ALL] over syscall_poems; None if not counted.
    syscalls_per_poem: float | None = None
    #: Why this cell has no count although one was asked for.
    syscalls_error: str = ""


@dataclass
class ColdStart:
    """Socket activation to the first byte: one server, several fresh starts."""

    server: str
    first_byte_ms: list[float] = field(default_factory=list)
    eof_ms: list[float] = field(default_factory=list)
    failures: int = 0
    #: Why there is no figure (nginx cannot be socket-activated), if so.
    note: str = ""

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.first_byte_ms) if self.first_byte_ms else None

    @property
    def p90_ms(self) -> float | None:
        if not self.first_byte_ms:
            return None
        ordered = sorted(self.first_byte_ms)
        return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


@dataclass
class Target:
    """One of the issue's targets, for one fastpoetry row."""

    server: str
    goal: str
    figure: str
    passed: bool | None  # None: not measured (a figure is missing)
    #: The clients of the cells it judges; None: all of the row's cells.
    concurrency: int | None = None


@dataclass
class Baseline:
    """--baseline: fastpoetry from a git commit, measured as one more row beside the work tree's."""

    rev: str  # as given on the command line
    commit: str  # the full hash it named
    label: str  # its row: "fastpoetry (REV)"
    source_hash: str  # of its copy, hashed as the work tree's copy is
    #: The two copies hash alike: both rows ran the same code, and any
    #: difference between them is the machine's.
    same_source: bool
    #: At report.TARGET_CONCURRENCY: fastpoetry's CPU µs/poem over the
    #: baseline's, the lowest and highest of that ratio in a single round,
    #: and whether the two are within report.BASELINE_TOLERANCE of each
    #: other; None while (or if) either row has no figure.
    cpu_ratio: float | None = None
    cpu_ratio_rounds: list[float] = field(default_factory=list)
    within_tolerance: bool | None = None


@dataclass
class Run:
    """Everything a run measured, and what it ran on."""

    started: str
    command: str
    smoke: bool
    machine: dict[str, Any]
    versions: dict[str, str]
    settings: dict[str, Any]
    #: Per server: "ok", or why it has no figures (it failed to start...).
    servers: dict[str, str] = field(default_factory=dict)
    cells: list[Cell] = field(default_factory=list)
    big_poem: list[Cell] = field(default_factory=list)
    cold_start: list[ColdStart] = field(default_factory=list)
    #: fastpoetry at --log-level info (its default) and debug.
    logging: list[Cell] = field(default_factory=list)
    logging_note: str = ""
    #: fastpoetry --workers 1 and 2, or why not.
    workers: list[Cell] = field(default_factory=list)
    workers_note: str = ""
    #: Why perf cannot count system calls on this machine ("" if it can).
    perf_unavailable: str = ""
    #: System calls by call at report.TARGET_CONCURRENCY, one slice per
    #: server after that concurrency's rounds.
    breakdown: list[SyscallCount] = field(default_factory=list)
    #: The 3 KB poem over TLS (its own section, its own rounds): cells, and
    #: per row "ok" or why it has none, and what its check's fetch
    #: negotiated ("TLSv1.3 TLS_AES_256_GCM_SHA384, no ticket").
    tls: list[Cell] = field(default_factory=list)
    tls_servers: dict[str, str] = field(default_factory=dict)
    tls_negotiated: dict[str, str] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    baseline: Baseline | None = None
    seconds: float = 0.0

    def cell(self, server: str, concurrency: int) -> Cell | None:
        for cell in self.cells:
            if cell.server == server and cell.concurrency == concurrency:
                return cell
        return None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for cold, record in zip(self.cold_start, data["cold_start"]):
            record["median_ms"] = cold.median_ms
            record["p90_ms"] = cold.p90_ms
        for count, record in zip(self.breakdown, data["breakdown"]):
            record["per_poem"] = {name: count.per_poem(name) for name in count.counts}
        return data
