"""A fleet: three fastpoetry hosts behind HAProxy, on Debian 13 (issue 16).

Five boxes, each booted with systemd-nspawn in a network namespace of its
own, with one link each to a bridge the test makes on the host
(:func:`~.helpers.host_bridge`).  The host has no address on the bridge
and routes nothing: every packet of the test stays on it, or on a box's
loopback.

    clients    10.77.0.100  fd77::100   threads fetching the poem without pause
    balancer   10.77.0.10   fd77::10    Debian's haproxy with docs/examples/haproxy.cfg, as it is
    host1..3   10.77.0.11 .. .13        the package, with a fleet host's drop-ins and
                                        docs/examples/fastpoetry-leave.service

The clients fetch through HAProxy, over IPv4 and IPv6, during each
scenario, and every fetch is sorted (helpers.KINDS) and counted in the
phase it started in.  The counts are the assertions, never the time
anything took; every wait is for a state (HAProxy's, systemd's, dpkg's).

(a) A rolling upgrade: one host after another is drained in HAProxy
    until it has no session, upgraded with apt-get, seen serving the new
    code, and put back.  No fetch fails.
(c) Each host's journal names the clients' true addresses (PEER=), over
    IPv4 and IPv6, and HAProxy's apart (BALANCER=).
(b) A host dies as a machine does: its link is cut, then its
    systemd-nspawn and the box's PID 1 are killed with SIGKILL
    (:meth:`~.helpers.Container.kill`; SIGKILL to systemd-nspawn alone
    leaves the box running).  The fetches it had in hand fail, at most one
    per client thread; those sent to it after go unanswered, and HAProxy
    tries them on another host; none fails that started after HAProxy
    marked it DOWN.  Then another host is powered
    off: no fetch fails.  That takes fastpoetry-leave.service: without
    it, the connections queued in the host's socket when it closes are
    reset, and HAProxy, which had them made, cannot try them elsewhere
    (8 and 16 fetches lost so in two poweroffs while this test was
    written).

They run in that order on the same boxes: (b) takes two hosts away.
"""

from __future__ import annotations

import contextlib
import csv
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import (
    HOST_ENV,
    INSTALLED_POEM,
    KINDS,
    PACKAGED_POEM,
    REPO,
    SCRATCH,
    WAIT,
    Builder,
    ClientLoop,
    Container,
    Package,
    host_bridge,
    image_with,
    installed_box,
    new_main_pid,
    repack,
    say,
    suites_to_test,
    wait_until,
)

pytestmark = pytest.mark.system

#: The fleet runs Debian 13 only.
SUITE = "trixie"

#: The balancer's configuration, which the test uses as it is; its
#: backend, and its admin socket.
HAPROXY_CFG = REPO / "docs/examples/haproxy.cfg"
BACKEND = "poets"
ADMIN_SOCKET = "/run/haproxy/admin.sock"

#: The hosts' unit that leaves the fleet at a poweroff, as it is, and what
#: it needs besides the package.
LEAVE_UNIT = REPO / "docs/examples/fastpoetry-leave.service"
HOST_PACKAGES = ("iproute2", "nftables")

#: The addresses of the boxes on the bridge (see the module's docstring).
BALANCER = ("10.77.0.10", "fd77::10")
HOSTS = {"host1": "10.77.0.11", "host2": "10.77.0.12", "host3": "10.77.0.13"}
CLIENTS = ("10.77.0.100", "fd77::100")
PREFIX = {4: 24, 6: 64}

#: The drop-ins that make a packaged host a member of the fleet (README,
#: "Several hosts"): the PROXY protocol, and the debug line that names each
#: client; the socket hands a connection over once its header is there.
SERVICE_DROP_IN = (
    "[Service]\nExecStart=\n"
    f"ExecStart=/usr/bin/fastpoetry serve --proxy-protocol --log-level debug --poem {INSTALLED_POEM}\n"
)
SOCKET_DROP_IN = "[Socket]\nDeferAcceptSec=1s\n"

#: Client threads fetching through the balancer, half over IPv4, half over IPv6.
THREADS = 8

#: A client gives up after this many seconds (counted as "timed out");
#: HAProxy's own timeouts (2 s to connect, 10 s of silence) end a session
#: with a dead host sooner.
PATIENCE = 30.0

#: Fetches that must finish between two steps of a scenario: the load goes on.
STEP = 150

#: argv: COMMAND.  Sends COMMAND to HAProxy's admin socket, prints the answer.
ADMIN = r"""
import socket, sys
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.settimeout(30)
    sock.connect(sys.argv[2])
    sock.sendall(sys.argv[1].encode() + b"\n")
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
sys.stdout.buffer.write(b"".join(chunks))
"""

#: argv: ADDRESS PORT.  Connects, sends a PROXY protocol v2 header of the
#: LOCAL command (as HAProxy's health checks do), prints what it receives.
FETCH_LOCAL = r"""
import socket, sys
LOCAL = b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00])
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as sock:
    sock.sendall(LOCAL)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
sys.stdout.buffer.write(b"".join(chunks))
"""


def address_with_prefix(address: str) -> str:
    return f"{address}/{PREFIX[6 if ':' in address else 4]}"


class Balancer:
    """The balancer's box, and HAProxy in it, through its admin socket."""

    def __init__(self, box: Container) -> None:
        self.box = box

    def admin(self, command: str) -> str:
        """HAProxy's answer to ``command`` on its admin socket."""
        return self.box.python(ADMIN, command, ADMIN_SOCKET).stdout.decode()

    def servers(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers: ``{name: {column: value}}``."""
        lines = self.admin("show stat").splitlines()
        assert lines and lines[0].startswith("# "), lines
        rows = csv.DictReader(lines[1:], fieldnames=lines[0][2:].split(","))
        return {row["svname"]: row for row in rows
                if row["pxname"] == BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")}

    def set_state(self, server: str, state: str) -> None:
        """``set server poets/SERVER state STATE``: ready, drain or maint."""
        answer = self.admin(f"set server {BACKEND}/{server} state {state}")
        assert answer.strip() == "", f"HAProxy said to 'state {state}' of {server}: {answer}"

    def wait_for(self, server: str, wanted: Callable[[dict[str, str]], bool], what: str) -> dict[str, str]:
        """Wait until ``wanted(row)`` of ``server``'s ``show stat`` row; return the row."""
        seen: list[dict[str, str]] = []

        def check() -> dict[str, str] | None:
            row = self.servers()[server]
            seen[:] = [row]
            return row if wanted(row) else None

        try:
            return wait_until(check, f"{server} {what}", interval=0.1)
        except AssertionError as exc:
            last = {k: seen[0].get(k) for k in ("status", "scur", "check_status", "last_chk")} if seen else None
            raise AssertionError(f"{exc}; HAProxy's last word on it: {last}") from None

    def wait_marked(self, server: str, status: str) -> None:
        """Wait until ``server``'s status is ``status``: UP, DOWN, DRAIN (up and drained), MAINT.

        ``UP 1/2`` and the like, a server on its way from one to the other
        after a check, do not count.
        """
        self.wait_for(server, lambda row: row["status"] == status, f"marked {status}")


@dataclass
class Fleet:
    balancer: Balancer
    hosts: dict[str, Container]
    clients: Container
    package: Package
    upgrade: Package

    def load(self) -> ClientLoop:
        """Client threads fetching through the balancer, half of them over IPv6."""
        return ClientLoop(self.clients, [PACKAGED_POEM.read_bytes()], threads=THREADS, addresses=BALANCER,
                          timeout=PATIENCE)


@contextlib.contextmanager
def fleet_of_boxes(config: pytest.Config, package: Package, upgrade: Package) -> Iterator[Fleet]:
    """The five boxes on a bridge, booted, HAProxy seeing every host up; all gone afterwards."""
    with contextlib.ExitStack() as cleanup:
        bridge = cleanup.enter_context(host_bridge())

        def box(name: str, addresses: tuple[str, ...], packages: list[Package], image: Path | None = None) -> Container:
            made = installed_box(config, SUITE, packages, name=f"fleet-{name}", image=image)
            cleanup.callback(made.destroy)
            made.use_addresses(*map(address_with_prefix, addresses))
            return made

        balancer = box("balancer", BALANCER, [], image=image_with(config, SUITE, ["haproxy"]))
        (balancer.root / "etc/haproxy/haproxy.cfg").write_text(HAPROXY_CFG.read_text())
        hosts = {}
        host_image = image_with(config, SUITE, HOST_PACKAGES)
        for name, address in HOSTS.items():
            host = hosts[name] = box(name, (address,), [package], image=host_image)
            for unit, text in (("fastpoetry.service", SERVICE_DROP_IN), ("fastpoetry.socket", SOCKET_DROP_IN)):
                drop_in = host.root / f"etc/systemd/system/{unit}.d/50-fleet.conf"
                drop_in.parent.mkdir(parents=True)
                drop_in.write_text(text)
            (host.root / f"etc/systemd/system/{LEAVE_UNIT.name}").write_text(LEAVE_UNIT.read_text())
            enable = subprocess.run(["chroot", str(host.root), "systemctl", "enable", LEAVE_UNIT.name],
                                    env=HOST_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True)
            assert enable.returncode == 0, f"enabling {LEAVE_UNIT.name} failed:\n{enable.stdout}{enable.stderr}"
            (host.root / SCRATCH.lstrip("/") / upgrade.path.name).write_bytes(upgrade.path.read_bytes())
        clients = box("clients", CLIENTS, [])

        boxes = [balancer, *hosts.values(), clients]
        say(config, f"booting {len(boxes)} boxes on bridge {bridge}: {', '.join(b.machine for b in boxes)}")
        for each in boxes:
            each.boot(network=[f"--network-bridge={bridge}"])
        for each in boxes:
            each.wait_online()
        fleet = Fleet(Balancer(balancer), hosts, clients, package, upgrade)
        assert balancer.is_active("haproxy.service") == "active", balancer.text(
            "journalctl", "--no-pager", "-u", "haproxy.service")
        for name in HOSTS:
            fleet.balancer.wait_marked(name, "UP")
        yield fleet


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest, builder: Builder,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if SUITE not in suites_to_test():
        pytest.skip(f"the fleet runs on Debian 13 ({SUITE}) only, which FASTPOETRY_TEST_SUITES leaves out")
    package = builder.package(SUITE)
    upgrade = repack(package, tmp_path_factory.mktemp("fleet-upgrade"), f"{package.version}+fleet1")
    with fleet_of_boxes(request.config, package, upgrade) as made:
        yield made


# ----------------------------------------------------------------------------
# What the counts say


def kinds(counts: dict) -> dict[str, int]:  # type: ignore[type-arg]
    """The kinds of fetch that happened, in KINDS order, without the zeros."""
    return {kind: counts["kinds"][kind] for kind in KINDS if counts["kinds"].get(kind)}


def report(config: pytest.Config, scenario: str, summary: dict) -> str:  # type: ignore[type-arg]
    """Say the counts of ``scenario``, in all and phase by phase; return the text."""
    lines = [f"{scenario}: {summary['ok'] + summary['failed']} fetches, {summary['failed']} failed: {kinds(summary)}"]
    for phase, counts in summary["phases"].items():
        lines.append(f"  fetches started in phase {phase!r}: {counts['ok'] + counts['failed']}, "
                     f"{counts['failed']} failed: {kinds(counts)}" + (f" {counts['errors']}" if counts["errors"] else ""))
    text = "\n".join(lines)
    say(config, text)
    return text


def failed_in(summary: dict, *phases: str) -> int:  # type: ignore[type-arg]
    return sum(summary["phases"].get(phase, {"failed": 0})["failed"] for phase in phases)


def started_in(summary: dict, phase: str) -> int:  # type: ignore[type-arg]
    counts = summary["phases"].get(phase, {"ok": 0, "failed": 0})
    return counts["ok"] + counts["failed"]


def served(fleet: Fleet) -> dict[str, int]:
    """Sessions HAProxy has sent to each host so far."""
    return {name: int(row["stot"]) for name, row in fleet.balancer.servers().items()}


def per_host(fleet: Fleet) -> str:
    """What HAProxy counted for each host: sessions, connections tried again, and of those elsewhere."""
    return ", ".join(f"{name}: {row['stot']} sessions, {row['wretr']} retried, {row['wredis']} redispatched"
                     for name, row in fleet.balancer.servers().items())


def fetch_local(host: Container) -> bytes:
    """A poem fetched on the host itself, with the LOCAL header of a health check."""
    return host.python(FETCH_LOCAL, "127.0.0.1", "10000").stdout


def installed_version(host: Container) -> str:
    return host.text("dpkg-query", "-W", "-f", "${Version}", "fastpoetry")


# ----------------------------------------------------------------------------
# The scenarios


def test_a_rolling_upgrade_host_by_host_fails_no_fetch(request: pytest.FixtureRequest, fleet: Fleet) -> None:
    """Drain, upgrade, put back, one host after another, under load: no fetch fails.

    HAProxy sends a drained host no new session; once it has none left,
    apt-get upgrades its package (the postinst restarts the server, the
    socket stays), the host is seen serving the new code and passing
    HAProxy's health check, and it is put back.
    """
    poem = PACKAGED_POEM.read_bytes()
    for name, host in fleet.hosts.items():
        assert installed_version(host) == fleet.package.version, name
    with fleet.load() as loop:
        loop.more(STEP)
        for name, host in fleet.hosts.items():
            loop.phase(f"{name} drained")
            fleet.balancer.set_state(name, "drain")
            fleet.balancer.wait_for(name, lambda row: row["scur"] == "0", "without sessions")
            old = host.main_pid()
            loop.phase(f"{name} upgraded")
            host.run("apt-get", "install", "-y", f"{SCRATCH}/{fleet.upgrade.path.name}", timeout=600)
            assert installed_version(host) == fleet.upgrade.version
            pid = new_main_pid(host, old)
            host.wait_for_journal(f"fastpoetry {fleet.upgrade.version} starting", f"_PID={pid}")
            assert fetch_local(host) == poem
            fleet.balancer.wait_marked(name, "DRAIN")  # up, its health check passing, and drained
            before = served(fleet)[name]
            loop.phase(f"{name} back")
            fleet.balancer.set_state(name, "ready")
            fleet.balancer.wait_marked(name, "UP")
            wait_until(lambda: served(fleet)[name] > before, f"{name} to be sent clients again")
            loop.more(STEP)
        summary = loop.stop()
    text = report(request.config, "(a) rolling upgrade of 3 hosts", summary)
    say(request.config, f"(a) HAProxy's counts: {per_host(fleet)}")
    assert summary["failed"] == 0, text
    for name in HOSTS:
        assert started_in(summary, f"{name} upgraded") > 0, text


def sending_lines(host: Container) -> list[dict[str, str]]:
    """The journal's debug lines of the host's server about poems it sent, with their fields."""
    host.run("journalctl", "--sync")
    out = host.text("journalctl", "--no-pager", "-o", "json", "-u", "fastpoetry.service",
                    "--output-fields=MESSAGE,PEER,BALANCER")
    lines = [json.loads(line) for line in out.splitlines() if line]
    return [line for line in lines if str(line.get("MESSAGE", "")).startswith("sending ")]


def host_part(address: str) -> str:
    """``10.1.2.3`` of ``10.1.2.3:4567``, ``fd00::1`` of ``[fd00::1]:4567``."""
    match = re.fullmatch(r"\[(.+)\]:\d+|([^:]+):\d+", address)
    assert match, address
    return match.group(1) or match.group(2)


def test_c_each_host_journal_names_the_clients_true_addresses(request: pytest.FixtureRequest, fleet: Fleet) -> None:
    """PEER= is the client's address from the PROXY header, over IPv4 and IPv6; BALANCER= is HAProxy's.

    The health checks' LOCAL connections have no client: PEER= is then the
    balancer itself, the real peer.
    """
    found: dict[str, dict[str, int]] = {}
    with fleet.load() as loop:
        loop.more(STEP)

        def both_clients_named() -> bool:
            for name, host in fleet.hosts.items():
                peers: dict[str, int] = {}
                for line in sending_lines(host):
                    key = f"PEER {host_part(line['PEER'])}" if "PEER" in line else "no PEER"
                    key += f", BALANCER {host_part(line['BALANCER'])}" if "BALANCER" in line else ", no BALANCER"
                    peers[key] = peers.get(key, 0) + 1
                found[name] = peers
            return all(any(CLIENTS[0] in key for key in peers) and any(CLIENTS[1] in key for key in peers)
                       for peers in found.values())

        try:
            wait_until(both_clients_named, "every host's journal to name both client addresses", interval=0.5)
        finally:
            summary = loop.stop()
            say(request.config, "(c) the hosts' debug lines 'sending N bytes of poetry', by their PEER= and BALANCER=:\n"
                + "\n".join(f"  {name}: {peers}" for name, peers in found.items()))
    report(request.config, "(c) load while reading the journals", summary)
    assert summary["failed"] == 0
    # Every line names a client through the balancer, or is a health check
    # from the balancer, or test (a)'s own fetch on the host (loopback).
    allowed = {f"PEER {client}, BALANCER {BALANCER[0]}" for client in CLIENTS} | {
        f"PEER {BALANCER[0]}, BALANCER {BALANCER[0]}", "PEER 127.0.0.1, BALANCER 127.0.0.1"}
    for name, peers in found.items():
        assert set(peers) <= allowed, f"{name}: {peers}"


def test_b_a_dead_host_costs_at_most_a_fetch_per_client_and_a_powered_off_one_none(
    request: pytest.FixtureRequest, fleet: Fleet
) -> None:
    """host1 dies (its link cut, then SIGKILL to its systemd-nspawn and PID 1); then host2 is powered off.

    host1 takes with it the fetches it had in hand: at most one per client
    thread, since each has one fetch at a time, and HAProxy ends them at
    "timeout server".  Nothing reaches it after the cut: the connections
    HAProxy tries to make to it before it marks it DOWN go unanswered, and
    are made on another host (retries, option redispatch); once it is
    DOWN, HAProxy sends it none.  Killed without the cut, a dying host
    would still take connections into its socket for a moment and reset
    them as it goes: a thread could lose two fetches.  Powered off (systemctl
    poweroff), host2 first stops fastpoetry-leave.service, which refuses
    new connections and waits until the server has taken those already
    made; HAProxy tries the refused ones elsewhere and marks the host
    DOWN.  Then the server finishes what it has, and its socket closes
    with nothing in it.
    """
    dead, off = fleet.hosts["host1"], fleet.hosts["host2"]
    with fleet.load() as loop:
        loop.more(STEP)
        loop.phase("host1 killed")
        dead.unplug()
        dead.kill()
        fleet.balancer.wait_for("host1", lambda row: row["status"].startswith("DOWN"), "marked DOWN")
        loop.phase("host1 down")
        loop.more(STEP)
        loop.phase("host2 powering off")
        off.run("systemctl", "poweroff", "--no-block")
        assert off.process is not None
        off.process.wait(timeout=WAIT)
        fleet.balancer.wait_for("host2", lambda row: row["status"].startswith("DOWN"), "marked DOWN")
        loop.phase("host2 down")
        loop.more(STEP)
        summary = loop.stop()
    text = report(request.config, "(b) host1 killed, then host2 powered off", summary)
    say(request.config, f"(b) HAProxy's counts: {per_host(fleet)}")
    assert failed_in(summary, "start", "host1 killed") <= THREADS, text
    assert failed_in(summary, "host1 down", "host2 powering off", "host2 down") == 0, text
    for phase in ("host1 down", "host2 powering off", "host2 down"):
        assert started_in(summary, phase) > 0, text
