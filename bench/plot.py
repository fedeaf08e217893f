"""The results as one PNG: poems/s, CPU per poem and p99 latency against concurrency, and 1 MiB throughput."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only

import matplotlib.pyplot as plt
from results import Cell, Run


def _by_server(cells: list[Cell]) -> dict[str, list[Cell]]:
    servers: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell.poems:
            servers.setdefault(cell.server, []).append(cell)
    return {name: sorted(found, key=lambda c: c.concurrency) for name, found in servers.items()}


def _against_concurrency(axes, cells: list[Cell], value, title: str, ylabel: str, log_y: bool = False) -> None:  # type: ignore[no-untyped-def]
    for server, found in _by_server(cells).items():
        axes.plot([c.concurrency for c in found], [value(c) for c in found], marker="o", label=server)
    axes.set_xscale("log", base=2)
    concurrencies = sorted({c.concurrency for c in cells})
    axes.set_xticks(concurrencies, [str(c) for c in concurrencies])
    if log_y:
        axes.set_yscale("log")
    else:
        axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.set_xlabel("concurrent clients")
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)


def write(run: Run, path: Path) -> None:
    """Draw the run's figures into ``path`` (PNG)."""
    figure, grid = plt.subplots(2, 2, figsize=(13, 9))
    poem = run.cells[0].poem_bytes if run.cells else 0
    _against_concurrency(grid[0][0], run.cells, lambda c: c.poems_per_s, f"Poems/s ({poem}-byte poem)", "poems/s")
    _against_concurrency(grid[0][1], run.cells, lambda c: c.cpu_us_per_poem, "Server CPU per poem", "µs")
    _against_concurrency(grid[1][0], run.cells, lambda c: c.p99_us / 1000, "p99 latency", "ms", log_y=True)
    if run.cells:
        grid[0][0].legend(fontsize="small")

    big = grid[1][1]
    served = [c for c in run.big_poem if c.poems]
    big.bar([c.server for c in served], [c.mb_per_s for c in served], color="tab:gray")
    big.set_title(f"1 MiB poem, {served[0].concurrency if served else '-'} clients")
    big.set_ylabel("MB/s")
    big.tick_params(axis="x", labelrotation=20, labelsize="small")
    big.grid(True, axis="y", alpha=0.3)

    smoke = " (smoke run: tiny counts)" if run.smoke else ""
    figure.suptitle(f"fastpoetry and its peers, server on one core{smoke}\n{run.machine['cpu']}, {run.started}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
