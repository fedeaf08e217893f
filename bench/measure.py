"""One measured cell: a warm-up, then load on a running server, and what it cost the server.

The server's CPU time and the cores' busy time are read just before and
just after the measured run, so the warm-up is not in them; nothing else
the benchmark does runs in between.  A failed connection in the warm-up
still counts as a failure of the cell.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import load
import procfs
from results import Cell
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


def cell(
    server: Server,
    loadgen: Path,
    cores: Cores,
    *,
    label: str,
    concurrency: int,
    poem_bytes: int,
    amount: Load,
) -> Cell:
    """Warm up, then measure ``concurrency`` clients on ``server``."""
    warm_failures: dict[str, int] = {}
    if amount.warm_up_poems or amount.warm_up_seconds:
        warm = load.steady(
            loadgen, cores.loadgen, server.port, poem_bytes, concurrency,
            poems=amount.warm_up_poems, seconds=amount.warm_up_seconds,
        )  # fmt: skip
        warm_failures = warm.failure_reasons()

    pids = server.pids()
    cpu_before = procfs.cpu_ns(pids)
    cores_before = procfs.core_times()
    run = load.steady(
        loadgen, cores.loadgen, server.port, poem_bytes, concurrency,
        poems=amount.poems, seconds=amount.seconds,
    )  # fmt: skip
    cores_used = {core: after - cores_before[core] for core, after in procfs.core_times().items()}
    pids_after = server.pids()
    server_cpu = (procfs.cpu_ns(pids_after) - cpu_before) / 1e9

    cores_measured = {*cores.server_list(), *cores.loadgen_list()}
    busy = sum(cores_used[c].busy for c in cores_measured) / procfs.TICKS_PER_SECOND
    available = sum(cores_used[c].total for c in cores_measured) / procfs.TICKS_PER_SECOND
    others = max(0.0, busy - server_cpu - run["cpu_s"])

    reasons = run.failure_reasons()
    for reason, count in warm_failures.items():
        reasons[reason] = reasons.get(reason, 0) + count
    poems = int(run["poems"])
    server_cores = cores.server_list()
    return Cell(
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
        steal_pct=max(cores_used[c].steal_percent() for c in cores_measured),
        others_pct=100.0 * others / available if available else 0.0,
        loadgen_cpu_s=run["cpu_s"],
        rss_kib=procfs.rss_kib(pids_after),
        processes=len(pids_after),
    )


def merge(cells: list[Cell]) -> Cell:
    """Several measured runs of one server under one load, as one cell.

    Counts and times are added, rates and CPU per poem recomputed from the
    sums, busy shares weighted by time; of the latencies only the median
    run's p50 and the worst run's p99 and maximum are kept.
    """
    seconds = sum(c.seconds for c in cells)
    poems = sum(c.poems for c in cells)
    cpu = sum(c.server_cpu_s for c in cells)
    reasons: dict[str, int] = {}
    for c in cells:
        for reason, count in c.failure_reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count

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
        p50_us=statistics.median(c.p50_us for c in cells),
        p90_us=max(c.p90_us for c in cells),
        p99_us=max(c.p99_us for c in cells),
        max_us=max(c.max_us for c in cells),
        server_cpu_s=cpu,
        cpu_us_per_poem=cpu * 1e6 / poems if poems else 0.0,
        server_core_busy_pct=sum(weighted(c.server_core_busy_pct, c) for c in cells),
        loadgen_core_busy_pct=sum(weighted(c.loadgen_core_busy_pct, c) for c in cells),
        steal_pct=max(c.steal_pct for c in cells),
        others_pct=sum(weighted(c.others_pct, c) for c in cells),
        loadgen_cpu_s=sum(c.loadgen_cpu_s for c in cells),
    )
