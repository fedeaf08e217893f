"""The benchmark works: ``bench/run --smoke`` starts every peer, loads it, and reports.

No figure is judged here: how fast a shared test machine is says nothing
about the code.  The smoke run has to work, though: every server starts,
serves the exact poem to every client, and shows up in the table, the
JSON and the plot.  nginx's configuration, which carries the poem in
nginx's own string syntax, is checked separately with the characters
that syntax treats specially.

``bench/run`` installs Debian packages with apt-get and Twisted and
matplotlib with pip, so these tests need root (and, the first time, the
network).  Without root they skip, except under ``CI=true``, where they
must run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import REPO, WAIT, fetch

BENCH = REPO / "bench"

#: The rows the issue asks for; each must have served poems without failure.
SERVERS = ("fastpoetry", "fastpoetry (activated)", "twisted", "nginx")

#: A hang guard for the whole smoke run, set-up included (apt, pip, gcc).
SMOKE_TIMEOUT = 900

pytestmark = pytest.mark.slow

#: The concurrency of the cells the issue's targets judge.
TARGET_CLIENTS = 64

#: The issue's targets that compare a fastpoetry row's figure with a peer's
#: in the same run: the cell field, the peer, the factor, and whether the
#: row's figure must be at most (True) or at least (False) factor x the peer's.
PEER_TARGETS = {
    "poems/s >= 1.5x Twisted": ("poems_per_s", "twisted", 1.5, False),
    "poems/s >= nginx": ("poems_per_s", "nginx", 1.0, False),
    "CPU/poem <= 1.3x nginx": ("cpu_us_per_poem", "nginx", 1.3, True),
    "p99 latency <= nginx": ("p99_us", "nginx", 1.0, True),
}
#: The limit of the memory target, in MiB.
TARGET_RSS_MIB = 30.0


def _require_root() -> None:
    if os.geteuid() == 0 and shutil.which("dpkg-query"):
        return
    reason = "bench/run installs Debian packages with apt-get: it needs root on Debian"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}, and under CI=true the benchmark's smoke test must run")
    pytest.skip(reason)


@dataclass
class Smoke:
    out: Path
    returncode: int
    stdout: str
    stderr: str

    def results(self) -> dict:  # type: ignore[type-arg]
        return json.loads((self.out / "results.json").read_text())

    def said(self) -> str:
        return f"exit status {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr[-5000:]}"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Smoke:
    """One ``bench/run --smoke`` for the whole module."""
    _require_root()
    out = tmp_path_factory.mktemp("bench-out")
    done = subprocess.run(
        [str(BENCH / "run"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return Smoke(out, done.returncode, done.stdout, done.stderr)


def test_smoke_run_exits_0_and_prints_every_table(smoke: Smoke) -> None:
    assert smoke.returncode == 0, smoke.said()
    for title in ("3 KB poem", "1 MiB poem", "Cold start", "Logging cost", "Workers", "TARGETS"):
        assert title in smoke.stdout, f"no {title!r} table:\n{smoke.said()}"
    # One progress line per cell, on standard error.
    assert smoke.stderr.count(" clients: ") >= 2 * len(SERVERS), smoke.said()


def test_every_server_serves_poems_with_no_failure(smoke: Smoke) -> None:
    results = smoke.results()
    for server in SERVERS:
        assert results["servers"].get(server) == "ok", f"{server}: {results['servers'].get(server)}\n{smoke.said()}"
        cells = [cell for cell in results["cells"] if cell["server"] == server]
        assert {cell["concurrency"] for cell in cells} == {1, 64}, cells
        for cell in cells:
            assert cell["poems"] > 0 and cell["failures"] == 0, cell
            assert cell["cpu_us_per_poem"] > 0 and cell["rss_kib"] > 0, cell
        big = [cell for cell in results["big_poem"] if cell["server"] == server]
        assert len(big) == 1 and big[0]["poems"] > 0 and big[0]["failures"] == 0, big
        assert big[0]["poem_bytes"] == 1024 * 1024
        rows = [line for line in smoke.stdout.splitlines() if line.startswith(f"{server} ")]
        assert len(rows) >= 3, f"{server} has no rows in the tables:\n{smoke.stdout}"


def test_results_json_records_the_machine_versions_and_every_section(smoke: Smoke) -> None:
    results = smoke.results()
    assert results["smoke"] is True
    for key in ("cpu", "cores", "kernel", "os"):
        assert results["machine"][key], results["machine"]
    for name in ("fastpoetry", "trio", "systemd-python", "twisted", "nginx", "gcc"):
        version = results["versions"][name]
        assert version and version != "not found", results["versions"]
    cell = results["cells"][0]
    for field in ("poems_per_s", "p50_us", "p99_us", "failures", "server_cpu_s", "cpu_us_per_poem",
                  "server_core_busy_pct", "loadgen_core_busy_pct", "others_pct", "rss_kib"):  # fmt: skip
        assert field in cell, cell

    cold = {record["server"]: record for record in results["cold_start"]}
    for server in ("fastpoetry (activated)", "twisted (activated)"):
        assert cold[server]["failures"] == 0 and cold[server]["first_byte_ms"], cold[server]
        assert cold[server]["median_ms"] > 0
    assert cold["nginx"]["note"], "nginx's cold start should say why it is not measured"

    levels = [cell["server"].split()[0] for cell in results["logging"]]
    assert levels == ["warning", "info", "debug"], results["logging"]
    assert all(cell["poems"] > 0 and cell["failures"] == 0 for cell in results["logging"])
    # Either measured or skipped with the reason, depending on the tree.
    assert results["workers"] or "skipped" in results["workers_note"], results["workers_note"]

    goals = {(target["server"], target["goal"]) for target in results["targets"]}
    assert ("fastpoetry", "poems/s >= nginx") in goals, goals
    # Each verdict is what the figures in the same file make it: a target
    # reported as met although its figure misses (or the other way round)
    # fails here, whichever way this machine's figures fall.
    for target in results["targets"]:
        assert target["passed"] is _verdict(results, target), target
    # ...and none is left out: the four against peers, memory, failures.
    for server in ("fastpoetry", "fastpoetry (activated)"):
        judged = [target["goal"] for target in results["targets"] if target["server"] == server]
        assert len(judged) == len(PEER_TARGETS) + 2 and set(PEER_TARGETS) <= set(judged), (server, judged)


def _cell(results: dict[str, Any], server: str) -> dict[str, Any]:
    """``server``'s cell at the targets' concurrency in ``results``."""
    found = [c for c in results["cells"] if c["server"] == server and c["concurrency"] == TARGET_CLIENTS]
    assert len(found) == 1, f"{len(found)} cells of {server} at {TARGET_CLIENTS} clients"
    return found[0]


def _verdict(results: dict[str, Any], target: dict[str, Any]) -> bool:
    """Whether ``target`` is met, worked out again from the cells in ``results``."""
    # Computed here on its own, not with bench/report.py: a slip there
    # (a flipped comparison, a wrong peer or factor) shows up as a mismatch.
    ours = _cell(results, target["server"])
    goal = target["goal"]
    if goal in PEER_TARGETS:
        field, peer, factor, at_most = PEER_TARGETS[goal]
        mine, theirs = ours[field], _cell(results, peer)[field]
        return mine <= factor * theirs if at_most else mine >= factor * theirs
    if goal.startswith(f"RSS <= {TARGET_RSS_MIB:g} MiB "):
        return ours["rss_kib"] / 1024 <= TARGET_RSS_MIB
    if goal == "no failed or short fetches (all its cells)":
        return sum(c["failures"] for c in results["cells"] if c["server"] == target["server"]) == 0
    raise AssertionError(f"a target this test does not know: {goal!r}")


def test_results_are_written_as_markdown_text_and_a_png(smoke: Smoke) -> None:
    png = (smoke.out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    markdown = (smoke.out / "results.md").read_text()
    assert "| fastpoetry | 64 |" in markdown, markdown
    assert (smoke.out / "results.txt").read_text().strip() in smoke.stdout


# --------------------------------------------------------------------------
# nginx's configuration carries the poem exactly.


def _nginx_conf():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCH))
    try:
        import nginx_conf
    finally:
        sys.path.remove(str(BENCH))
    return nginx_conf


#: Poems that exercise each way the poem goes into nginx.conf: one plain
#: token, a token with variables for the dollars, and chunks of a poem
#: longer than one token, some cut inside an escape sequence's reach.
TRICKY_POEMS = {
    "plain": b"A plain short poem; with {braces} and # hashes\n",
    "specials": 'He wrote "$5", then \\n, \\" and ${x} and $1 and $$ — done. $\n'.encode(),
    "long": "".join(f'{n:05d} "quoted" \\ back $dollar ${{brace}} $ {"é" * (n % 7)}\n' for n in range(400)).encode(),
}


@pytest.fixture
def serve_with_nginx(smoke: Smoke, tmp_path: Path) -> Iterator[Callable[[bytes], bytes]]:
    """Serve a poem with nginx and the benchmark's configuration; what one client receives."""
    del smoke  # it installed nginx and its stream module
    nginx_conf = _nginx_conf()
    processes: list[subprocess.Popen[bytes]] = []

    def serve(poem: bytes) -> bytes:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        conf = tmp_path / "nginx.conf"
        conf.write_bytes(nginx_conf.render(poem, port, tmp_path, backlog=64))
        errors = tmp_path / "startup-errors.log"
        process = subprocess.Popen(
            ["nginx", "-p", str(tmp_path), "-c", str(conf), "-e", str(errors)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(process)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                return fetch(("127.0.0.1", port))
            except ConnectionRefusedError:
                said = errors.read_text() if errors.exists() else ""
                assert process.poll() is None, f"nginx exited ({process.returncode}): {said}"
                assert time.monotonic() < deadline, f"nginx did not listen within {WAIT} s: {said}"
                time.sleep(0.05)

    yield serve
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.wait(WAIT)


@pytest.mark.parametrize("name", sorted(TRICKY_POEMS))
def test_nginx_serves_the_poem_byte_for_byte_whatever_its_characters(
    serve_with_nginx: Callable[[bytes], bytes], name: str
) -> None:
    poem = TRICKY_POEMS[name]
    assert serve_with_nginx(poem) == poem


# --------------------------------------------------------------------------
# --baseline REV: a REV that names no commit stops the run before it measures.


def test_a_bad_baseline_revision_is_one_line_and_measures_nothing(tmp_path: Path) -> None:
    _require_root()
    done = subprocess.run(
        [str(BENCH / "run"), "--smoke", "--baseline", "no-such-revision", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=SMOKE_TIMEOUT, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    said = [line for line in done.stderr.splitlines() if line.startswith("bench:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(said) == 1 and "no-such-revision" in said[0], done.stderr[-2000:]
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "logs").exists()
