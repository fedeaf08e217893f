"""Restart storms, crash loops and chaos under load: the socket never fails.

systemd holds fastpoetry.socket while the service restarts, so clients wait
in its queue instead of being refused, as long as the socket unit itself
does not fail.  Its default start limit would fail it: these tests show
the packaged units' restart policy keeping it listening (README,
"Robustness"), on each suite with the package built there.  Every fetch is
sorted (helpers.KINDS); the counts are the assertions, never the time
something took.

The tests share the session's container (see conftest.py); they run after
test_system.py, which purges the package, so the ``installed`` fixture puts
it back for this module.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from .helpers import (
    INSTALLED_POEM,
    KINDS,
    PACKAGED_POEM,
    POEMS,
    WAIT,
    ClientLoop,
    Container,
    journal_cursor,
    new_main_pid,
    started_service,
    wait_until,
)

pytestmark = pytest.mark.system

#: Where fastpoetry-proxy.socket listens.
PROXY_PORT = 10001

#: Client threads fetching without pause, as in the issue's measurements.
CLIENTS = 8

#: A client gives up after this many seconds (counted as "timed out").
PATIENCE = 30.0

#: The unit's ExecStart= with a poem file the chaos swaps under a reload.
CHAOS_POEM = "/etc/fastpoetry/chaos-poem.txt"
POEM_A = (POEMS / "lantern.txt").read_bytes()
POEM_B = (POEMS / "long-winter.txt").read_bytes()

#: How long the chaos lasts, and the pause between two of its blows.
CHAOS_SECONDS = 60.0
PAUSE = (0.3, 1.5)

#: Loaded by python3 before fastpoetry (see site): reading a poem raises an
#: exception fastpoetry does not expect, so the server crashes at every
#: start with exit status 70, as a bug would make it.
CRASHING_READ = """\
import fastpoetry.poetry
def read_poem(path, max_size=None):
    raise RuntimeError("a bug in reading poems (a crash loop made by the test)")
fastpoetry.poetry.read_poem = read_poem
"""
CRASH_DIRECTORY = "/etc/fastpoetry/crash"
CRASH_DROP_IN = "/etc/systemd/system/fastpoetry.service.d/50-crash.conf"

#: How long the server crashes at every start before it is fixed.
CRASH_SECONDS = 30.0

#: The settings that only systemd 254 and later know (Debian 13).
BACK_OFF = {"bookworm": False, "trixie": True}


@pytest.fixture(autouse=True)
def _clean(installed: Container) -> Iterator[None]:
    """Each test starts from a running service with nothing failed, and leaves it so."""
    installed.reset_failed()
    yield
    installed.run("rm", "-rf", CRASH_DROP_IN, CRASH_DIRECTORY)
    installed.run("systemctl", "daemon-reload")
    installed.reset_failed()


def kinds(summary: dict) -> dict[str, int]:  # type: ignore[type-arg]
    return {kind: summary["kinds"][kind] for kind in KINDS if summary["kinds"][kind]}


def assert_nothing_lost(summary: dict, empty_allowed: int = 0) -> None:  # type: ignore[type-arg]
    """No fetch refused, reset, timed out, cut short or foreign; at most ``empty_allowed`` empty."""
    sorted_ = kinds(summary)
    bad = {kind: n for kind, n in sorted_.items() if kind not in ("whole", "empty")}
    assert bad == {}, f"fetches sorted {sorted_}: {summary['errors']}"
    assert sorted_.get("empty", 0) <= empty_allowed, f"fetches sorted {sorted_}: {summary['errors']}"
    assert sorted_.get("whole", 0) > 0, sorted_


def assert_both_units_active(container: Container) -> None:
    def active() -> bool:
        return container.is_active("fastpoetry.service") == "active"

    wait_until(active, "fastpoetry.service to be active again")
    assert container.is_active("fastpoetry.socket") == "active"
    assert container.show("fastpoetry.socket", "Result") == "success"


@contextmanager
def serving_chaos_poem(container: Container) -> Iterator[None]:
    """The service serves CHAOS_POEM (poem A), from a drop-in; put back afterwards."""
    container.write(CHAOS_POEM, POEM_A)
    exec_start = f"[Service]\nExecStart=\nExecStart=/usr/bin/fastpoetry serve --poem {CHAOS_POEM}\n"
    with container.drop_in("50-chaos-poem.conf", exec_start):
        container.run("systemctl", "restart", "fastpoetry.service")
        try:
            yield
        finally:
            container.run("rm", "-f", CHAOS_POEM)


def test_ten_restarts_as_fast_as_systemctl_returns_refuse_no_client(installed: Container) -> None:
    """10 restarts in a row under load: every fetch whole, both units active, no start limit hit."""
    container = installed
    pid = started_service(container)
    with ClientLoop(container, [PACKAGED_POEM.read_bytes()], threads=CLIENTS, timeout=PATIENCE,
                    poem_files=[INSTALLED_POEM]) as loop:
        loop.wait_for(100)
        for _ in range(10):
            container.run("systemctl", "restart", "fastpoetry.service")
        pid = new_main_pid(container, pid)
        loop.more(200)
        summary = loop.stop()
    print(f"10 restarts: fetches {kinds(summary)}")
    assert_nothing_lost(summary)
    assert_both_units_active(container)
    assert "start-limit" not in container.text("systemctl", "status", "--no-pager", "fastpoetry.socket", check=False)


def test_ten_restarts_of_the_proxy_as_fast_as_systemctl_returns_refuse_no_client(installed: Container) -> None:
    """fastpoetry-proxy has the same policy: 10 restarts in a row under load, every fetch whole.

    Each new proxy fetches the poem from its upstream (the local server)
    before it serves, so no client meets a proxy with nothing cached.
    """
    container = installed
    started_service(container)
    container.run("systemctl", "enable", "--now", "fastpoetry-proxy.socket")
    try:
        assert container.fetch(port=PROXY_PORT) == PACKAGED_POEM.read_bytes()
        with ClientLoop(container, [PACKAGED_POEM.read_bytes()], threads=CLIENTS, timeout=PATIENCE,
                        poem_files=[INSTALLED_POEM], port=PROXY_PORT) as loop:
            loop.wait_for(100)
            for _ in range(10):
                container.run("systemctl", "restart", "fastpoetry-proxy.service")
            loop.more(200)
            summary = loop.stop()
        print(f"10 proxy restarts: fetches {kinds(summary)}")
        assert_nothing_lost(summary)
        assert container.is_active("fastpoetry-proxy.service") == "active"
        assert container.is_active("fastpoetry-proxy.socket") == "active"
        assert container.show("fastpoetry-proxy.socket", "Result") == "success"
    finally:
        container.run("systemctl", "disable", "--now", "fastpoetry-proxy.socket")
        container.run("systemctl", "stop", "fastpoetry-proxy.service")
        container.run("systemctl", "reset-failed", "fastpoetry-proxy.service", "fastpoetry-proxy.socket", check=False)


def test_a_minute_of_kills_restarts_and_reloads_refuses_no_client(installed: Container) -> None:
    """kill -9, systemctl restart and reloads swapping the poem, one every 0.3-1.5 s for 60 s.

    Every fetch is a whole poem (A or B), but at most one empty reply per
    kill -9: the connection the killed process had accepted and not yet
    sent to (it accepts and sends one at a time).  A reload asked while the
    service restarts may fail; those are counted apart, not as clients.
    """
    container = installed
    blows = {"kill -9": 0, "restart": 0, "reload ok": 0, "reload failed": 0}
    chooser = random.Random()
    with serving_chaos_poem(container):
        poem = POEM_A
        with ClientLoop(container, [POEM_A, POEM_B], threads=CLIENTS, timeout=PATIENCE,
                        poem_files=[CHAOS_POEM]) as loop:
            loop.wait_for(100)
            end = time.monotonic() + CHAOS_SECONDS
            while time.monotonic() < end:
                time.sleep(chooser.uniform(*PAUSE))
                blow = chooser.choice(("kill -9", "restart", "reload"))
                if blow == "kill -9":
                    pid = container.main_pid()
                    if pid and container.run("kill", "-9", str(pid), check=False).returncode == 0:
                        blows["kill -9"] += 1
                elif blow == "restart":
                    container.run("systemctl", "restart", "fastpoetry.service", timeout=WAIT)
                    blows["restart"] += 1
                else:
                    poem = POEM_B if poem == POEM_A else POEM_A
                    container.write(CHAOS_POEM, poem)
                    done = container.run("systemctl", "reload", "fastpoetry.service", check=False, timeout=WAIT)
                    blows["reload ok" if done.returncode == 0 else "reload failed"] += 1
            assert_both_units_active(container)
            loop.more(100)
            summary = loop.stop()
    print(f"chaos for {CHAOS_SECONDS:g} s: {blows}; fetches {kinds(summary)}")
    assert_nothing_lost(summary, empty_allowed=blows["kill -9"])
    assert blows["kill -9"] and blows["restart"] and blows["reload ok"], blows
    assert len(summary["digests"]) == 2, "both poems were served"
    assert_both_units_active(container)


def _restart_delay_next(container: Container) -> int | None:
    """systemd's next restart delay in microseconds (RestartUSecNext, systemd 254+)."""
    done = container.run(
        "busctl", "get-property", "org.freedesktop.systemd1", "/org/freedesktop/systemd1/unit/fastpoetry_2eservice",
        "org.freedesktop.systemd1.Service", "RestartUSecNext", check=False,
    )
    match = re.fullmatch(r"t (\d+)", done.stdout.decode().strip())
    return int(match.group(1)) if match else None


def test_a_crash_loop_backs_off_keeps_the_socket_and_the_waiting_client_gets_the_poem(
    installed: Container, suite: str
) -> None:
    """A server that exits 70 at every start for 30 s, then is fixed, with no systemctl command.

    The socket never fails, and the patient client connected when the loop
    began (it waits up to 120 s, longer than the loop and the last delay)
    gets the whole poem from the first server that starts after the fix.
    The restart delay grows: on 13 by RestartSteps= (read from systemd's
    RestartUSecNext); on 12, whose systemd cannot, by the ExecStartPre= that
    sleeps the rest of the same schedule (read from what it logs).  The
    journal says how many restarts there were and why.
    """
    container = installed
    started_service(container)
    container.write(f"{CRASH_DIRECTORY}/sitecustomize.py", CRASHING_READ.encode())
    container.write(CRASH_DROP_IN, f"[Service]\nEnvironment=PYTHONPATH={CRASH_DIRECTORY}\n".encode())
    container.run("systemctl", "daemon-reload")
    cursor = journal_cursor(container)
    # A restart by hand: systemd counts the automatic restarts from here.
    container.run("systemctl", "restart", "--no-block", "fastpoetry.service")
    patient = container.fetch_later(timeout=120)
    delays: list[int] = []
    socket_states: set[tuple[str, str]] = set()
    end = time.monotonic() + CRASH_SECONDS
    while time.monotonic() < end:
        delay = _restart_delay_next(container)
        if delay is not None and (not delays or delay != delays[-1]):
            delays.append(delay)
        socket_states.add((container.is_active("fastpoetry.socket"), container.show("fastpoetry.socket", "Result")))
        time.sleep(0.2)
    status = container.text("systemctl", "status", "--no-pager", "fastpoetry.service", check=False)
    # The fix: the drop-in goes; the next automatic restart takes the unit as it is now.
    container.run("rm", "-f", CRASH_DROP_IN)
    container.run("systemctl", "daemon-reload")
    reply, errors = patient.communicate(timeout=180)
    assert patient.returncode == 0, errors.decode(errors="replace")
    assert reply == PACKAGED_POEM.read_bytes(), f"{len(reply)} bytes"
    assert_both_units_active(container)
    assert socket_states == {("active", "success")}, socket_states

    crashes = int(container.show("fastpoetry.service", "NRestarts"))
    journal = container.text("journalctl", "--no-pager", "-o", "cat", "--after-cursor", cursor,
                             "-u", "fastpoetry.service")
    print(f"crash loop for {CRASH_SECONDS:g} s: {crashes} restarts, delays seen (us): {delays}")
    assert crashes >= 2, journal
    assert journal.count("a crash loop made by the test") >= crashes, "each start crashed with the traceback logged"
    assert re.search(r"Scheduled restart job, restart counter is at \d+", journal), journal
    assert "status=70/SOFTWARE" in journal
    assert "auto-restart" in status or "activating" in status, status
    assert container.show("fastpoetry.service", "RestartUSec") == "500ms"
    if BACK_OFF[suite]:
        # 500 ms, then longer each time, up to 10 s.
        assert delays == sorted(delays) and len(delays) >= 3, delays
        assert delays[0] <= 1_000_000 and delays[-1] == 10_000_000, delays
        assert "restart-delay" not in journal
    else:
        assert delays == [], "systemd 252 has no RestartUSecNext"
        # 500 ms of RestartSec=, and then restart-delay's sleep, up to 9.5 s more.
        waits = [float(wait) for wait in re.findall(r"in a row: waiting ([\d.]+) s more", journal)]
        print(f"restart-delay waited (s): {waits}")
        assert waits == sorted(waits) and len(waits) >= 3 and waits[-1] == 9.5, journal


def test_a_bad_configuration_under_load_turns_clients_away_without_spinning(installed: Container) -> None:
    """A poem that cannot be loaded, under continuous load: every client is closed unserved.

    No client is refused (the socket keeps listening), and no restart
    follows (exit 1).  Each start that finds clients waiting turns away
    those arriving for 5 s before it exits, so in D seconds of load there
    are at most D / 5 + 1 starts, however many clients come: a slow machine
    only makes fewer.  Once the poem is there, the next client starts the
    service and gets it, without systemctl reset-failed.
    """
    container = installed
    missing = "/etc/fastpoetry/not-yet.txt"
    exec_start = f"[Service]\nExecStart=\nExecStart=/usr/bin/fastpoetry serve --poem {missing}\n"
    with container.drop_in("50-missing-poem.conf", exec_start):
        container.run("systemctl", "stop", "fastpoetry.service")
        container.reset_failed()
        cursor = journal_cursor(container)
        began = time.monotonic()
        with ClientLoop(container, [PACKAGED_POEM.read_bytes()], threads=CLIENTS, timeout=PATIENCE) as loop:
            loop.wait_for(200)
            time.sleep(12)
            summary = loop.stop()
        elapsed = time.monotonic() - began
        wait_until(lambda: container.is_active("fastpoetry.service") in ("failed", "inactive"), "the last start to end")
        journal = container.text("journalctl", "--no-pager", "-o", "cat", "--after-cursor", cursor,
                                 "--identifier=fastpoetry")
        starts = len(re.findall(r"^fastpoetry \S+ starting$", journal, re.MULTILINE))
        sorted_ = kinds(summary)
        print(f"bad poem under load for {elapsed:.0f} s: {starts} starts; fetches {sorted_}")
        assert set(sorted_) == {"empty"}, f"fetches sorted {sorted_}: {summary['errors']}"
        assert 1 <= starts <= elapsed / 5 + 1, journal
        assert "turning away the clients that arrive for 5 s before exiting" in journal
        assert f"cannot load a poem from {missing}: no such file or directory" in journal
        assert container.show("fastpoetry.service", "NRestarts") == "0"
        assert container.is_active("fastpoetry.socket") == "active"
        assert container.show("fastpoetry.socket", "Result") == "success"

        container.write(missing, PACKAGED_POEM.read_bytes())
        try:
            assert container.fetch() == PACKAGED_POEM.read_bytes()
            assert container.is_active("fastpoetry.service") == "active"
        finally:
            container.run("rm", "-f", missing)
