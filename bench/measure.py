"""Load on a running server, and what it cost the server: a warm-up, a measured slice, a merged cell.

A cell (one server at one concurrency) is measured in slices, one per
round, the servers of a section taking turns (see sections.py); the
warm-up comes once, before the first.  The server's CPU time and the
cores' busy time are read just before and just after each slice, so the
warm-up is not in them; nothing else the benchmark does runs in between.
A failed connection in the warm-up still counts as a failure of the cell.
System calls are counted in a short slice of their own, right after the
slice that measures the CPU: perf's counting slows the calls it counts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import load
import procfs
import syscalls
from load import Histogram
from results import Cell, Round, SyscallCount
from servers import Server


@dataclass(frozen=True)
class Load:
    """How much load a cell gets: a number of poems or a duration, after a warm-up."""

    poems: int | None = None
    seconds: float | None = None
    warm_up_poems: int | None = None
    warm_up_seconds: float | None = None


@dataclass(frozen=True)
class Cores:
    """Where the server and the load generator run (taskset lists)."""

    server: str
    loadgen: str

    def server_list(self) -> list[int]:
        return _parse_list(self.server)

    def loadgen_list(self) -> list[int]:
        return _parse_list(self.loadgen)


def _parse_list(cores: str) -> list[int]:
    found: list[int] = []
    for part in cores.split(","):
        first, _, last = part.partition("-")
        found.extend(range(int(first), int(last or first) + 1))
    return found


def warm_up(server: Server, loadgen: Path, cores: Cores, *, concurrency: int, poem_bytes: int, amount: Load) -> dict[str, int]:
    """The warm-up ``amount`` asks for, if any; its failures, by reason."""
    if not (amount.warm_up_poems or amount.warm_up_seconds):
        return {}
    warm = load.steady(
        loadgen, cores.loadgen, server.port, poem_bytes, concurrency,
        poems=amount.warm_up_poems, seconds=amount.warm_up_seconds, proxy_header=server.launch.proxy_header,
        tls=server.launch.tls,
    )  # fmt: skip
    return warm.failure_reasons()


@dataclass
class Slice:
    """One measured run of one server: its figures, its latency histogram, and where it ran in its round."""

    cell: Cell
    latency: Histogram
    round: int = 1
    position: int = 1


def measured(
    server: Server,
    loadgen: Path,
    cores: Cores,
    *,
    label: str,
    concurrency: int,
    poem_bytes: int,
    amount: Load,
) -> Slice:
    """``concurrency`` clients on ``server`` for ``amount`` (its warm-up left to warm_up)."""
    pids = server.pids()
    cpu_before = procfs.cpu_ns(pids)
    cores_before = procfs.core_times()
    run = load.steady(
        loadgen, cores.loadgen, server.port, poem_bytes, concurrency,
        poems=amount.poems, seconds=amount.seconds, proxy_header=server.launch.proxy_header,
        tls=server.launch.tls,
    )  # fmt: skip
    cores_used = {core: after - cores_before[core] for core, after in procfs.core_times().items()}
    pids_after = server.pids()
    server_cpu = (procfs.cpu_ns(pids_after) - cpu_before) / 1e9

    measured_cores = [cores_used[c] for c in sorted({*cores.server_list(), *cores.loadgen_list()})]
    busy = sum(c.busy for c in measured_cores) / procfs.TICKS_PER_SECOND
    available = sum(c.total for c in measured_cores) / procfs.TICKS_PER_SECOND
    stolen = sum(c.steal for c in measured_cores) / procfs.TICKS_PER_SECOND
    others = max(0.0, busy - server_cpu - run["cpu_s"])

    reasons = run.failure_reasons()
    poems = int(run["poems"])
    server_cores = cores.server_list()
    cell = Cell(
        server=label,
        concurrency=concurrency,
        poem_bytes=poem_bytes,
        server_cores=cores.server,
        poems=poems,
        failures=sum(reasons.values()),
        failure_reasons=reasons,
        seconds=run["seconds"],
        poems_per_s=run["rate"],
        mb_per_s=run["bytes"] / run["seconds"] / 1e6 if run["seconds"] else 0.0,
        mean_us=run["mean_us"],
        p50_us=run["p50_us"],
        p90_us=run["p90_us"],
        p99_us=run["p99_us"],
        max_us=run["max_us"],
        server_cpu_s=server_cpu,
        cpu_us_per_poem=server_cpu * 1e6 / poems if poems else 0.0,
        server_core_busy_pct=sum(cores_used[c].busy_percent() for c in server_cores) / len(server_cores),
        loadgen_core_busy_pct=sum(cores_used[c].busy_percent() for c in cores.loadgen_list()) / len(cores.loadgen_list()),
        steal_pct=100.0 * stolen / available if available else 0.0,
        others_pct=100.0 * others / available if available else 0.0,
        loadgen_cpu_s=run["cpu_s"],
        rss_kib=procfs.rss_kib(pids_after),
        processes=len(pids_after),
    )
    return Slice(cell, run.histogram)


def counted(
    server: Server,
    loadgen: Path,
    cores: Cores,
    *,
    label: str,
    concurrency: int,
    poem_bytes: int,
    amount: Load,
    names: tuple[str, ...],
) -> SyscallCount:
    """The system calls ``names`` (syscalls.ALL: every call) of ``server``'s tree under ``amount`` of load.

    A slice of its own, whose time and CPU count for nothing: perf's
    counters slow every call they count, which would show in the CPU of
    the slice next to it.  They are on from just before the load to just
    after it (perf answers once they are).  If perf cannot start, no load
    is run and the count says why; its connections' failures count as the
    cell's, as the warm-up's do.
    """
    counting = syscalls.Count(names, server.pids())
    try:
        try:
            counting.start()
        except syscalls.PerfFailed as exc:
            return SyscallCount(label, concurrency, 0, 0, {}, error=str(exc))
        run = load.steady(
            loadgen, cores.loadgen, server.port, poem_bytes, concurrency,
            poems=amount.poems, seconds=amount.seconds, proxy_header=server.launch.proxy_header,
            tls=server.launch.tls,
        )  # fmt: skip
        reasons = run.failure_reasons()
        try:
            counts, error = counting.stop(), ""
        except syscalls.PerfFailed as exc:
            counts, error = {}, str(exc)
        return SyscallCount(label, concurrency, int(run["poems"]), sum(reasons.values()), reasons, counts, error)
    finally:
        counting.close()


def with_count(piece: Slice, count: SyscallCount) -> Slice:
    """``piece`` with the system calls of the counting slice that followed it, and that slice's failures."""
    reasons = dict(piece.cell.failure_reasons)
    _add_reasons(reasons, count.failure_reasons)
    cell = replace(
        piece.cell, failures=sum(reasons.values()), failure_reasons=reasons,
        syscalls=count.counts, syscall_poems=count.poems if count.counts else 0,
        syscalls_per_poem=count.per_poem(syscalls.ALL), syscalls_error=count.error,
    )  # fmt: skip
    return replace(piece, cell=cell)


def _add_reasons(into: dict[str, int], more: dict[str, int]) -> None:
    for reason, count in more.items():
        into[reason] = into.get(reason, 0) + count


def merge(slices: list[Slice], warm_failures: dict[str, int] | None = None) -> Cell:
    """One server's slices of a cell, in the order they ran, as one cell.

    Counts and times are added; poems/s is all the poems over all the
    time, CPU per poem all the CPU over all the poems; busy, others and
    steal shares are weighted by time.  Latency percentiles come from the
    slices' histograms added bucket by bucket, so they are the percentiles
    of every poem of the cell, as one long run would have given them; the
    mean is weighted by poems, the maximum the largest.  Failures are
    every slice's, the warm-up's and every attempt's; RSS and the process
    count are the last slice's: after the whole cell.  System calls, from
    the counting slices, are added up as the CPU is, if every slice has a
    count; otherwise the cell has none, and says why.
    """
    cells = [s.cell for s in slices]
    counts, counted_poems, error = _add_counts(cells)
    seconds = sum(c.seconds for c in cells)
    poems = sum(c.poems for c in cells)
    cpu = sum(c.server_cpu_s for c in cells)
    reasons: dict[str, int] = dict(warm_failures or {})
    for c in cells:
        _add_reasons(reasons, c.failure_reasons)
    latency = Histogram.total(s.latency for s in slices)

    def weighted(value: float, c: Cell) -> float:
        return value * c.seconds / seconds if seconds else 0.0

    return replace(
        cells[-1],
        poems=poems,
        failures=sum(reasons.values()),
        failure_reasons=reasons,
        seconds=seconds,
        poems_per_s=poems / seconds if seconds else 0.0,
        mb_per_s=sum(weighted(c.mb_per_s, c) for c in cells),
        mean_us=sum(c.mean_us * c.poems for c in cells) / poems if poems else 0.0,
        p50_us=latency.percentile_us(0.50),
        p90_us=latency.percentile_us(0.90),
        p99_us=latency.percentile_us(0.99),
        max_us=max(c.max_us for c in cells),
        server_cpu_s=cpu,
        cpu_us_per_poem=cpu * 1e6 / poems if poems else 0.0,
        server_core_busy_pct=sum(weighted(c.server_core_busy_pct, c) for c in cells),
        loadgen_core_busy_pct=sum(weighted(c.loadgen_core_busy_pct, c) for c in cells),
        steal_pct=sum(weighted(c.steal_pct, c) for c in cells),
        others_pct=sum(weighted(c.others_pct, c) for c in cells),
        loadgen_cpu_s=sum(c.loadgen_cpu_s for c in cells),
        attempts=sum(c.attempts for c in cells),
        rounds=[_round(s) for s in slices],
        syscalls=counts,
        syscall_poems=counted_poems,
        syscalls_per_poem=counts[syscalls.ALL] / counted_poems if syscalls.ALL in counts and counted_poems else None,
        syscalls_error=error,
    )


def _add_counts(cells: list[Cell]) -> tuple[dict[str, int], int, str]:
    """The slices' system calls added up, and their poems; or none, and the first slice's reason why."""
    for cell in cells:
        if cell.syscalls_error:
            return {}, 0, cell.syscalls_error
    if not cells or any(not c.syscalls or c.syscalls.keys() != cells[0].syscalls.keys() for c in cells):
        return {}, 0, ""
    counts = {name: sum(c.syscalls[name] for c in cells) for name in cells[0].syscalls}
    return counts, sum(c.syscall_poems for c in cells), ""


def _round(piece: Slice) -> Round:
    c = piece.cell
    return Round(
        round=piece.round, position=piece.position, poems=c.poems, seconds=c.seconds,
        poems_per_s=c.poems_per_s, cpu_us_per_poem=c.cpu_us_per_poem, p99_us=c.p99_us,
        others_pct=c.others_pct, steal_pct=c.steal_pct, attempts=c.attempts,
        syscalls_per_poem=c.syscalls_per_poem,
    )  # fmt: skip


def quietest(attempts: list[Slice]) -> Slice:
    """Of attempts at one slice, the one least disturbed by other work.

    With every attempt's failures, and the last attempt's RSS (the RSS after it all).
    """
    reasons: dict[str, int] = {}
    for attempt in attempts:
        _add_reasons(reasons, attempt.cell.failure_reasons)
    best = min(attempts, key=lambda s: s.cell.others_pct)
    cell = replace(
        best.cell, failures=sum(reasons.values()), failure_reasons=reasons,
        rss_kib=attempts[-1].cell.rss_kib, attempts=len(attempts),
    )  # fmt: skip
    return replace(best, cell=cell)
