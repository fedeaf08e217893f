"""The README's quick start, as written, on a fresh Debian 12 and 13.

The first command sets up and runs the server from the source tree; the
next ones fetch a poem.  They are taken from README.md itself and run in a
fresh root of each suite (debootstrap's minbase: no /etc/hosts, none of
the packages the command installs), as root, as the README says.  The
setup (apt-get) runs with the host's network; the server and the fetch run
in a network of their own, with only a loopback, so nothing else can
answer on port 10000.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .helpers import HOST_ENV, REPO, apt_archives, export_tree, fresh_root, nspawn_command, run_logged

pytestmark = pytest.mark.system

#: The poem `fastpoetry serve` serves without --poem.
BUNDLED_POEM = REPO / "src/fastpoetry/default-poem.txt"

#: Run in the root, in the source tree: starts the server given as $1 in the
#: background, fetches with the command given as $2 until it answers (a hang
#: guard of 60 s), stops the server with SIGINT as Ctrl-C would, fails if it did not exit 0,
#: and writes the poem it fetched to standard output.
SERVE_AND_FETCH = r"""
set -m  # the server in a process group of its own, SIGINT not ignored: as at a terminal
(eval "$1") 2>/tmp/serve.log &
server=$!
for _ in $(seq 300); do
    if (eval "$2") >/tmp/poem 2>/dev/null && [ -s /tmp/poem ]; then
        break
    fi
    sleep 0.2
done
kill -INT -- "-$server"  # Ctrl-C
wait "$server" || { echo "the server exited $?:" >&2; cat /tmp/serve.log >&2; exit 1; }
cat /tmp/poem
"""


def quick_start() -> tuple[str, list[str]]:
    """The README's quick-start command and its fetch commands (comments dropped)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Quick start"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) >= 2, f"the quick start has no command and fetch blocks:\n{section}"
    command = blocks[0].strip()
    assert "\n" not in command, f"the quick start's first block is not one command: {command!r}"
    fetches = [line.split("#", 1)[0].strip() for line in blocks[1].strip().splitlines()]
    return command, [fetch for fetch in fetches if fetch]


def test_readme_quick_start_serves_a_poem_in_a_fresh_root(
    request: pytest.FixtureRequest, suite: str, tmp_path: Path
) -> None:
    """The README's first command and its bash fetch, in a fresh minbase root: the bundled poem, byte for byte."""
    command, fetches = quick_start()
    setup, separator, serve = command.rpartition(" && ")
    assert separator and serve.endswith("-m fastpoetry serve"), command
    fetch = next((f for f in fetches if "/dev/tcp/" in f), None)
    assert fetch, f"no bash /dev/tcp fetch among {fetches}"
    source = tmp_path / "src"
    export_tree(source)
    binds = (f"{source}:/src", f"{apt_archives(suite)}:/var/cache/apt/archives")
    with fresh_root(request.config, suite) as root:
        assert not (root / "etc/hosts").exists()
        options = ["--chdir=/src", "--setenv=DEBIAN_FRONTEND=noninteractive"]
        run_logged(request.config, nspawn_command(root, "/bin/sh", "-c", setup, binds=binds, options=options),
                   tmp_path / "setup.log", f"The README's quick-start setup in a fresh {suite} root: {setup}",
                   timeout=1800)
        done = subprocess.run(
            nspawn_command(root, "/bin/bash", "-c", SERVE_AND_FETCH, "bash", serve, fetch, binds=binds,
                           options=[*options, "--private-network"]),
            env=HOST_ENV, stdin=subprocess.DEVNULL, capture_output=True, timeout=300,
        )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout == BUNDLED_POEM.read_bytes(), done.stderr.decode(errors="replace")
