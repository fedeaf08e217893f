"""The systemd units in packaging/systemd, checked on the host.

They are also installed and run under real systemd by tests/system/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import DEFAULT_POEM, REPO, WAIT, NoLocalhost, Server

UNITS = REPO / "packaging" / "systemd"
SERVICE = UNITS / "fastpoetry.service"
SOCKET = UNITS / "fastpoetry.socket"
PROXY_SERVICE = UNITS / "fastpoetry-proxy.service"
PROXY_SOCKET = UNITS / "fastpoetry-proxy.socket"
TLS_SERVICE = UNITS / "fastpoetry-tls.service"
TLS_SOCKET = UNITS / "fastpoetry-tls.socket"
#: The drop-in that hands fastpoetry-tls.service its certificate and key as credentials.
TLS_CREDENTIALS = REPO / "docs" / "examples" / "fastpoetry-tls-credentials.conf"
LEAVE = REPO / "docs" / "examples" / "fastpoetry-leave.service"
DEBIAN = REPO / "packaging" / "debian"

#: What systemd-analyze security rates the proxy (Debian 12's systemd 252):
#: fastpoetry.service's 0.2 plus what reaching the network costs, and nothing
#: else (see test_proxy_is_exposed_only_where_it_needs_the_network).
PROXY_EXPOSURE = 1.1

#: The checks of systemd-analyze security that a service reaching the
#: network cannot pass; IPAddressDeny= could, but only if the unit knew
#: the upstream's address.
NETWORK_CHECKS = {"PrivateNetwork=", "RestrictAddressFamilies=~AF_(INET|INET6)", "IPAddressDeny="}

#: fastpoetry.service's settings the proxy leaves out or changes because it
#: connects to its upstream itself.
NETWORK_SETTINGS = {"PrivateNetwork", "IPAddressDeny", "RestrictAddressFamilies"}

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze (package systemd) is not installed"
)


def settings(unit: Path) -> dict[str, dict[str, list[str]]]:
    """The unit's sections and settings, every value of repeated keys kept."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def security(unit: Path) -> tuple[float, set[str]]:
    """systemd-analyze security's exposure of ``unit`` and the checks it fails."""
    output = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=WAIT, check=True,
    ).stdout
    match = re.search(rf"Overall exposure level for {re.escape(unit.name)}: (\d+\.\d+)", output)
    assert match, output
    failed = {line.split()[1] for line in output.splitlines() if line.startswith("\N{BALLOT X} ")}
    return float(match.group(1)), failed


@needs_analyze
def test_service_exposure_is_at_most_one() -> None:
    """systemd-analyze security rates the service 1.0 or lower."""
    exposure, failed = security(SERVICE)
    assert exposure <= 1.0, failed


def test_service_is_a_notify_service_run_as_its_own_user() -> None:
    """Type=notify, User=/Group=fastpoetry, a reload command and a watchdog."""
    service = settings(SERVICE)["Service"]
    assert service["Type"] == ["notify"]
    assert service["User"] == ["fastpoetry"] and service["Group"] == ["fastpoetry"]
    assert service["ExecReload"] == ["/usr/bin/fastpoetry reload"]
    assert service["ExecStart"][0].startswith("/usr/bin/fastpoetry serve --poem /usr/share/fastpoetry/poems/")
    assert service["Restart"] == ["on-failure"] and "WatchdogSec" in service
    # The socket starts the service: it has no [Install] of its own.
    assert "Install" not in settings(SERVICE)


@pytest.mark.parametrize("unit", [SERVICE, PROXY_SERVICE, TLS_SERVICE], ids=lambda unit: unit.name)
def test_restarts_never_hit_a_start_limit_and_back_off(unit: Path) -> None:
    """No start limit (hitting it would fail the socket); restarts after crashes only, backing off to 10 s."""
    sections = settings(unit)
    assert sections["Unit"]["StartLimitIntervalSec"] == ["0"]
    service = sections["Service"]
    assert service["Restart"] == ["on-failure"] and service["RestartPreventExitStatus"] == ["1 2"]
    assert service["RestartSec"] == ["500ms"]
    assert service["RestartSteps"] == ["5"] and service["RestartMaxDelaySec"] == ["10s"]
    # For systemd 252, whose build keeps this line instead of the two above.
    assert service["ExecStartPre"] == ["-/usr/libexec/fastpoetry/restart-delay %n"]


def systemd_restart_delay(restarts: int) -> float:
    """The delay before automatic restart number ``restarts`` in a row, in seconds, on systemd 254+.

    RestartSec=500ms, RestartSteps=5, RestartMaxDelaySec=10s, as systemd's
    service_restart_usec_next() computes it.
    """
    if restarts <= 1:
        return 0.5
    if restarts > 5:
        return 10.0
    return 0.5 * (10.0 / 0.5) ** ((restarts - 1) / 5)


@pytest.mark.parametrize("restarts", range(9))
def test_restart_delay_waits_what_systemd_254_would_have(tmp_path: Path, restarts: int) -> None:
    """packaging/libexec/restart-delay: 500 ms (RestartSec=) plus its sleep is systemd 254's delay, to 0.01 s."""
    for name, body in (
        ("systemctl", f'[ "$*" = "show --property=NRestarts --value -- fastpoetry.service" ] && echo {restarts}'),
        ("sleep", 'echo "slept $1"'),
    ):
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    done = subprocess.run(
        [str(REPO / "packaging/libexec/restart-delay"), "fastpoetry.service"],
        capture_output=True, text=True, timeout=WAIT, env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    slept = float(done.stdout.split("slept ")[1]) if "slept " in done.stdout else 0.0
    assert abs(0.5 + slept - systemd_restart_delay(restarts)) < 0.01, done.stdout


def test_restart_delay_lets_the_start_go_on_when_systemd_cannot_be_asked(tmp_path: Path) -> None:
    """Without an answer it fails at once, saying why; the unit's "-" prefix then ignores it."""
    (tmp_path / "systemctl").write_text("#!/bin/sh\necho 'Failed to connect to bus' >&2\nexit 1\n")
    (tmp_path / "systemctl").chmod(0o755)
    done = subprocess.run(
        [str(REPO / "packaging/libexec/restart-delay"), "fastpoetry.service"],
        capture_output=True, text=True, timeout=WAIT, env={"PATH": f"{tmp_path}:/usr/bin:/bin"},
    )
    assert done.returncode != 0 and "Failed to connect to bus" in done.stderr


def test_socket_is_named_and_wanted_by_sockets_target() -> None:
    """ListenStream=10000, a FileDescriptorName=, and enabled via sockets.target."""
    socket_unit = settings(SOCKET)
    assert socket_unit["Socket"]["ListenStream"] == ["10000"]
    assert socket_unit["Socket"]["FileDescriptorName"] == ["poetry"]
    assert socket_unit["Install"]["WantedBy"] == ["sockets.target"]


def test_packaged_poem_exists() -> None:
    """The poem ExecStart= names is one the package installs from poems/."""
    command = settings(SERVICE)["Service"]["ExecStart"][0]
    installed = Path(command.split("--poem ")[1].split()[0])
    assert (REPO / "poems" / installed.name).is_file()
    install = (REPO / "packaging" / "debian" / "fastpoetry.install").read_text()
    assert "poems/*.txt usr/share/fastpoetry/poems/" in install


# ----------------------------------------------------------------------------
# The proxy: fastpoetry-proxy.socket and fastpoetry-proxy.service


@needs_analyze
def test_proxy_service_exposure_is_what_the_network_costs() -> None:
    """systemd-analyze security rates the proxy 1.1 (fastpoetry.service: 0.2)."""
    exposure, _ = security(PROXY_SERVICE)
    assert exposure <= PROXY_EXPOSURE, f"{PROXY_SERVICE.name} rated {exposure}, more than {PROXY_EXPOSURE}"


@needs_analyze
def test_proxy_is_exposed_only_where_it_needs_the_network() -> None:
    """Every check the proxy fails that fastpoetry.service passes is about the network."""
    _, proxy_failed = security(PROXY_SERVICE)
    _, server_failed = security(SERVICE)
    assert proxy_failed - server_failed == NETWORK_CHECKS


def test_proxy_is_hardened_like_the_server_but_for_the_network() -> None:
    """The proxy has every hardening setting of fastpoetry.service, the network aside."""
    server = settings(SERVICE)["Service"]
    proxy = settings(PROXY_SERVICE)["Service"]
    first_hardening = list(server).index("PrivateNetwork")
    hardening = {key: value for key, value in list(server.items())[first_hardening:] if key not in NETWORK_SETTINGS}
    assert "NoNewPrivileges" in hardening and "SystemCallFilter" in hardening, hardening
    for key, value in hardening.items():
        assert proxy.get(key) == value, f"{key}: {proxy.get(key)} in the proxy, {value} in fastpoetry.service"
    assert "PrivateNetwork" not in proxy
    assert proxy["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    # The upstream may be anywhere: no address list, which would have to
    # follow ExecStart=.
    assert "IPAddressDeny" not in proxy and "IPAddressAllow" not in proxy


def test_proxy_service_is_a_notify_service_run_as_its_own_user() -> None:
    """Type=notify as fastpoetry, the local server as upstream, reload, watchdog, restart rules."""
    unit = settings(PROXY_SERVICE)
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["User"] == ["fastpoetry"] and service["Group"] == ["fastpoetry"]
    # A literal address: nothing to look up, so it works without /etc/hosts;
    # fastpoetry.socket's [::]:10000 is dual-stack, and takes IPv4 too.
    assert service["ExecStart"] == ["/usr/bin/fastpoetry proxy --upstream 127.0.0.1:10000"]
    assert service["ExecReload"] == ["/usr/bin/fastpoetry reload"]
    assert service["Restart"] == ["on-failure"] and service["RestartPreventExitStatus"] == ["1 2"]
    assert service["WatchdogSec"] == ["10s"] and service["LimitNOFILE"] == ["65536"]
    assert unit["Unit"]["Documentation"] == ["man:fastpoetry(8)"]
    assert unit["Unit"]["Requires"] == ["fastpoetry-proxy.socket"]
    assert "fastpoetry-proxy.socket" in unit["Unit"]["After"]
    # Nothing pulls in the local server: with another upstream it is not
    # needed, and the proxy copes with an upstream that is down.
    named = {name for values in unit["Unit"].values() for value in values for name in value.split()}
    assert not named & {"fastpoetry.socket", "fastpoetry.service"}, named
    # The socket starts the service: it has no [Install] of its own.
    assert "Install" not in unit


def test_proxy_socket_listens_on_10001_and_is_wanted_by_sockets_target() -> None:
    """ListenStream=10001 (the proxy's default port), enabled via sockets.target if the admin wants."""
    socket_unit = settings(PROXY_SOCKET)
    assert socket_unit["Socket"]["ListenStream"] == ["10001"]
    assert socket_unit["Install"]["WantedBy"] == ["sockets.target"]


def test_proxy_command_fetches_from_the_local_server_where_localhost_resolves_to_nothing(
    no_localhost: Callable[..., NoLocalhost], start_server: Callable[..., Server]
) -> None:
    """The proxy's ExecStart=, run where no name resolves, serves the local server's poem.

    As in a root without /etc/hosts: the upstream is a literal address, and
    the proxy listens (here, without its socket unit) on its default
    --iface, 127.0.0.1 and ::1, which is never looked up either.
    """
    [command] = settings(PROXY_SERVICE)["Service"]["ExecStart"]
    program, *args = command.split()
    assert program == "/usr/bin/fastpoetry"
    fastpoetry = [sys.executable, "-m", "fastpoetry"]
    namespaces = no_localhost()
    server = start_server("serve", command=namespaces.command(*fastpoetry))
    server.wait_ready()
    proxy = start_server(*args, command=namespaces.command(*fastpoetry))
    proxy.wait_ready()
    assert "INFO: fetched a poem from upstream 127.0.0.1:10000 " in proxy.log()
    for host in ("127.0.0.1", "::1"):
        assert namespaces.fetch(host, 10001) == DEFAULT_POEM.read_bytes()


@pytest.mark.parametrize(
    ("socket_unit", "service_unit"), [(PROXY_SOCKET, PROXY_SERVICE), (TLS_SOCKET, TLS_SERVICE)],
    ids=["proxy", "tls"],
)
def test_package_installs_the_optional_units_without_enabling_them(socket_unit: Path, service_unit: Path) -> None:
    """Both units of the proxy, and both of the server over TLS, are installed. The socket
    is not enabled, is started only if the administrator enabled it, is stopped on removal
    and is not restarted on upgrade; the socket starts the service, and the prerm stops it
    after the socket.
    """
    rules = (DEBIAN / "rules").read_text().splitlines()
    name = socket_unit.stem
    # dh_installsystemd installs debian/fastpoetry.NAME.UNIT (with --name)
    # where the suite keeps units; the rules copy it from the tree's one
    # copy (the service without what the suite's systemd lacks).
    assert f"\tcp packaging/systemd/{socket_unit.name} debian/fastpoetry.{socket_unit.name}" in rules
    unit = service_unit.name
    assert f"\t$(UNIT_FILTER) packaging/systemd/{unit} > debian/fastpoetry.{unit}" in rules
    assert "lib/systemd" not in (DEBIAN / "fastpoetry.install").read_text()
    calls = {
        line.split()[-1]: set(line.split()[1:-1])
        for line in rules
        if line.strip().startswith("dh_installsystemd")
    }
    assert calls[socket_unit.name] == {f"--name={name}", "--no-enable", "--no-stop-on-upgrade"}
    assert calls[service_unit.name] == {f"--name={name}", "--no-enable", "--no-start", "--no-stop-on-upgrade"}
    assert f"deb-systemd-invoke stop {service_unit.name}" in (DEBIAN / "fastpoetry.prerm").read_text()
    assert f"deb-systemd-invoke try-restart {service_unit.name}" in (DEBIAN / "fastpoetry.postinst").read_text()
    # The copies the rules make are build output, removed by "debian/rules clean".
    clean = (DEBIAN / "clean").read_text().splitlines()
    assert f"debian/fastpoetry.{socket_unit.name}" in clean and f"debian/fastpoetry.{unit}" in clean


# ----------------------------------------------------------------------------
# The server over TLS: fastpoetry-tls.socket, fastpoetry-tls.service and the
# drop-in that hands it its certificate and key as credentials


def environment(values: list[str]) -> dict[str, str]:
    """The variables that ``Environment=`` lines set, the later line winning (no quoting used here)."""
    variables: dict[str, str] = {}
    for value in values:
        for assignment in value.split():
            name, _, setting = assignment.partition("=")
            variables[name] = setting
    return variables


def with_drop_in(unit: Path, drop_in: Path, directory: Path) -> Path:
    """A copy of ``unit`` in ``directory`` with the settings of ``drop_in`` appended, as systemd
    applies a drop-in (systemd-analyze --offline reads no drop-in next to a unit file)."""
    merged = directory / unit.name
    merged.write_text(unit.read_text() + "\n" + drop_in.read_text())
    return merged


@needs_analyze
def test_tls_service_exposure_is_at_most_one(tmp_path: Path) -> None:
    """systemd-analyze security rates the TLS service 1.0 or lower, with and without the credentials drop-in."""
    for unit in (TLS_SERVICE, with_drop_in(TLS_SERVICE, TLS_CREDENTIALS, tmp_path)):
        exposure, failed = security(unit)
        assert exposure <= 1.0, (unit, failed)


@needs_analyze
def test_tls_service_fails_no_check_that_the_server_passes() -> None:
    """Serving over TLS costs no hardening: the TLS service fails the checks fastpoetry.service fails, no more."""
    _, tls_failed = security(TLS_SERVICE)
    _, server_failed = security(SERVICE)
    assert tls_failed == server_failed


def test_tls_service_is_hardened_exactly_like_the_server() -> None:
    """Every setting from the hardening on (PrivateNetwork= to the end) is fastpoetry.service's, and
    so are the restart, watchdog and limit settings: it reads /etc/fastpoetry on a read-only file system."""
    server = settings(SERVICE)["Service"]
    tls = settings(TLS_SERVICE)["Service"]
    first_hardening = list(server).index("PrivateNetwork")
    hardening = dict(list(server.items())[first_hardening:])
    assert list(tls)[list(tls).index("PrivateNetwork"):] == list(hardening)
    for key in (*hardening, "Type", "User", "Group", "Restart", "RestartSec", "RestartSteps", "RestartMaxDelaySec",
                "ExecStartPre", "RestartPreventExitStatus", "WatchdogSec", "TimeoutStopSec", "LimitNOFILE",
                "ExecReload"):
        assert tls.get(key) == server.get(key), f"{key}: {tls.get(key)} for TLS, {server.get(key)} in fastpoetry.service"
    assert settings(TLS_SERVICE)["Unit"]["StartLimitIntervalSec"] == ["0"]


def test_tls_service_serves_the_packaged_poem_with_the_certificate_in_etc() -> None:
    """The server's own command line plus --tls-cert ${TLS_CERT} --tls-key ${TLS_KEY}, which
    name /etc/fastpoetry/tls.crt and tls.key; a control socket in a folder of its own; started by its socket."""
    unit = settings(TLS_SERVICE)
    service = unit["Service"]
    [server_command] = settings(SERVICE)["Service"]["ExecStart"]
    assert service["ExecStart"] == [f"{server_command} --tls-cert ${{TLS_CERT}} --tls-key ${{TLS_KEY}}"]
    assert environment(service["Environment"]) == {
        "TLS_CERT": "/etc/fastpoetry/tls.crt", "TLS_KEY": "/etc/fastpoetry/tls.key",
    }
    # fastpoetry reload finds the control socket in $RUNTIME_DIRECTORY: one
    # folder per unit, or "systemctl reload" of one would reload the other.
    folders = {path.name: settings(path)["Service"]["RuntimeDirectory"] for path in (SERVICE, PROXY_SERVICE, TLS_SERVICE)}
    assert folders[TLS_SERVICE.name] == ["fastpoetry-tls"]
    assert len({folder for [folder] in folders.values()}) == 3, folders
    assert unit["Unit"]["Requires"] == [TLS_SOCKET.name] and TLS_SOCKET.name in unit["Unit"]["After"]
    assert unit["Unit"]["Documentation"] == ["man:fastpoetry(8)"]
    # The socket starts the service: it has no [Install] of its own.
    assert "Install" not in unit


def test_tls_socket_listens_on_10443_apart_from_the_plain_one() -> None:
    """ListenStream=10443, a name of its own, enabled via sockets.target if the admin wants;
    fastpoetry.socket's port stays plain."""
    socket_unit = settings(TLS_SOCKET)
    assert socket_unit["Socket"]["ListenStream"] == ["10443"]
    assert socket_unit["Socket"]["FileDescriptorName"] == ["tls"]
    assert socket_unit["Install"]["WantedBy"] == ["sockets.target"]
    assert settings(SOCKET)["Socket"]["ListenStream"] == ["10000"]


def test_credentials_drop_in_points_the_service_at_copies_of_the_same_files() -> None:
    """The drop-in loads /etc/fastpoetry/tls.crt and tls.key as credentials and sets TLS_CERT and
    TLS_KEY to their copies in %d, and nothing else: ExecStart= stays the unit's. The package ships it."""
    drop_in = settings(TLS_CREDENTIALS)
    assert list(drop_in) == ["Service"]
    service = drop_in["Service"]
    assert set(service) == {"LoadCredential", "Environment"}
    credentials = dict(value.split(":", 1) for value in service["LoadCredential"])
    assert credentials == {"tls.crt": "/etc/fastpoetry/tls.crt", "tls.key": "/etc/fastpoetry/tls.key"}
    unit_paths = environment(settings(TLS_SERVICE)["Service"]["Environment"])
    copies = environment(service["Environment"])
    assert copies == {"TLS_CERT": "%d/tls.crt", "TLS_KEY": "%d/tls.key"}
    # Each copy is of the very file the unit reads without the drop-in.
    for variable, copy in copies.items():
        assert credentials[copy.removeprefix("%d/")] == unit_paths[variable]
    examples = (DEBIAN / "fastpoetry.examples").read_text().splitlines()
    assert str(TLS_CREDENTIALS.relative_to(REPO)) in examples


# --------------------------------------------------------------------------
# The example fastpoetry-leave.service (tests/system/test_fleet.py runs it)


def test_leave_unit_refuses_and_waits_on_the_port_the_socket_listens_on() -> None:
    """One Environment=PORT= names the port, the socket unit's; both ExecStop= lines use it, and no other number."""
    service = settings(LEAVE)["Service"]
    [listen] = settings(SOCKET)["Socket"]["ListenStream"]
    assert environment(service["Environment"]) == {"PORT": listen}
    assert len(service["ExecStop"]) == 2
    for command in service["ExecStop"]:
        assert "${PORT}" in command and listen not in command, command

