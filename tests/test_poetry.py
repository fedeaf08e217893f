"""Poems: reading and checking poem files, and the service that keeps one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from helpers import WAIT
from fastpoetry.poetry import (
    DEFAULT_MAX_POEM_SIZE,
    DEFAULT_POEM_PATH,
    PoemError,
    PoetryService,
    read_poem,
)

#: An unprivileged user and group to read files as when the tests run as root.
NOBODY = 65534


def read_with_hang_guard(path: str) -> bytes | BaseException:
    """``read_poem(path)`` in a thread; fails the test if it never returns.

    A read stuck in ``open()`` on a FIFO is released by opening the FIFO for
    writing, so that a failing test does not hang the run.
    """
    outcome: list[bytes | BaseException] = []

    def call() -> None:
        try:
            outcome.append(read_poem(path))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(WAIT)
    if thread.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(WAIT)
        pytest.fail(f"read_poem({path!r}) blocked for {WAIT} s")
    return outcome[0]


def poem_error(call: Callable[[], object]) -> PoemError:
    """The PoemError that ``call()`` raises."""
    with pytest.raises(PoemError) as info:
        call()
    return info.value


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory that an unprivileged user may enter (tmp_path is root's own)."""
    path = Path(tempfile.mkdtemp(prefix="fastpoetry-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


# read_poem


@pytest.mark.parametrize(
    "content",
    [
        b"The lamps are lit along the quay.\nThe ferry waits.\n",
        "Ein Fährmann zählt die Laternen — ☾ 灯\n".encode(),
        b"a poem that ends without a newline",
    ],
    ids=["ascii", "non-ascii-utf8", "no-trailing-newline"],
)
def test_read_poem_returns_the_exact_bytes(tmp_path: Path, content: bytes) -> None:
    """read_poem returns the file's bytes unchanged."""
    path = tmp_path / "poem.txt"
    path.write_bytes(content)
    assert read_poem(str(path)) == content


def test_read_poem_follows_a_symlink_to_a_poem(tmp_path: Path) -> None:
    """A symbolic link to a valid poem reads as that poem."""
    target = tmp_path / "poem.txt"
    target.write_bytes(b"linked verse\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target)
    assert read_poem(str(link)) == b"linked verse\n"


def test_read_poem_refuses_a_missing_file(tmp_path: Path) -> None:
    """A missing file is a PoemError that names the file and says it does not exist."""
    path = str(tmp_path / "absent.txt")
    error = poem_error(lambda: read_poem(path))
    assert error.path == path
    assert path in str(error)
    assert "no such file or directory" in str(error)


def test_read_poem_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    """A link to nothing is a PoemError saying there is no such file."""
    link = tmp_path / "link.txt"
    link.symlink_to(tmp_path / "absent.txt")
    error = poem_error(lambda: read_poem(str(link)))
    assert str(link) in str(error) and "no such file or directory" in str(error)


def test_read_poem_refuses_a_path_through_a_regular_file(tmp_path: Path) -> None:
    """A path whose directory part is a file cannot be opened: PoemError 'not a directory'."""
    (tmp_path / "file").write_bytes(b"verse\n")
    path = str(tmp_path / "file" / "poem.txt")
    error = poem_error(lambda: read_poem(path))
    assert path in str(error) and "not a directory" in str(error)


def test_read_poem_refuses_a_file_without_read_permission(shared_dir: Path) -> None:
    """A mode-000 file read by an unprivileged user (uid 65534 via setpriv as root): 'permission denied'."""
    # Root reads any file whatever its mode, so as root the read runs in a
    # child process whose uid, gid and groups are dropped with setpriv.
    path = shared_dir / "secret.txt"
    path.write_bytes(b"a verse nobody may read\n")
    path.chmod(0o000)
    if os.geteuid() != 0:
        error = poem_error(lambda: read_poem(str(path)))
        assert str(path) in str(error) and "permission denied" in str(error)
        return
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, which reads any file, and setpriv is missing")
    probe = (
        "import json, sys\n"
        "from fastpoetry.poetry import PoemError, read_poem\n"
        "try:\n"
        "    read_poem(sys.argv[1])\n"
        "    print(json.dumps({'error': None}))\n"
        "except PoemError as exc:\n"
        "    print(json.dumps({'error': str(exc)}))\n"
    )
    result = subprocess.run(
        [
            setpriv,
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-c",
            probe,
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert result.returncode == 0, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error is not None, "an unprivileged user read a mode-000 file"
    assert str(path) in error and "permission denied" in error


def test_read_poem_refuses_a_directory(tmp_path: Path) -> None:
    """A directory is a PoemError 'not a regular file (a directory)'."""
    error = poem_error(lambda: read_poem(str(tmp_path)))
    assert str(tmp_path) in str(error) and "a directory" in str(error)


def test_read_poem_of_a_directory_leaves_no_descriptor_open(tmp_path: Path) -> None:
    """Refusing a directory closes the descriptor opened on it."""
    with pytest.raises(Exception):  # noqa: B017 - the kind is the other test's concern
        read_poem(str(tmp_path))
    fds = Path("/proc/self/fd")
    leaked = [fd.name for fd in fds.iterdir() if os.path.realpath(fd) == str(tmp_path)]
    assert leaked == []


def test_read_poem_refuses_a_fifo_without_waiting_for_a_writer(tmp_path: Path) -> None:
    """A FIFO with no writer is refused at once as 'not a regular file (a FIFO)'."""
    fifo = tmp_path / "poem.fifo"
    os.mkfifo(fifo)
    outcome = read_with_hang_guard(str(fifo))
    assert isinstance(outcome, PoemError), outcome
    assert str(fifo) in str(outcome) and "not a regular file (a FIFO)" in str(outcome)


def test_read_poem_refuses_a_character_device() -> None:
    """/dev/null is refused as 'not a regular file (a character device)'."""
    error = poem_error(lambda: read_poem(os.devnull))
    assert os.devnull in str(error)
    assert "not a regular file (a character device)" in str(error)


def test_read_poem_refuses_an_empty_file(tmp_path: Path) -> None:
    """An empty file is a PoemError saying so."""
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    error = poem_error(lambda: read_poem(str(path)))
    assert str(path) in str(error) and "the file is empty" in str(error)


def test_read_poem_takes_a_poem_of_exactly_the_limit(tmp_path: Path) -> None:
    """max_size is inclusive."""
    path = tmp_path / "poem.txt"
    path.write_bytes(b"x" * 99 + b"\n")
    assert read_poem(str(path), max_size=100) == b"x" * 99 + b"\n"


def test_read_poem_refuses_a_file_over_the_limit(tmp_path: Path) -> None:
    """One byte over max_size is a PoemError giving the size and the limit."""
    path = tmp_path / "poem.txt"
    path.write_bytes(b"x" * 100 + b"\n")
    error = poem_error(lambda: read_poem(str(path), max_size=100))
    assert str(error) == (
        f"cannot load a poem from {path}: too big for a poem: "
        "101 bytes, more than the largest poem allowed (100 bytes)"
    )


def test_read_poem_refuses_a_huge_file_without_reading_it(tmp_path: Path) -> None:
    """The default limit refuses a file of many gigabytes at once, from its size."""
    path = tmp_path / "huge.txt"
    with open(path, "wb") as file:
        file.truncate(64 * 1024**3)  # sparse: 64 GiB that would not fit in memory
    error = poem_error(lambda: read_poem(str(path)))
    assert f"{64 * 1024**3} bytes, more than the largest poem allowed ({DEFAULT_MAX_POEM_SIZE} bytes)" in str(error)


def test_read_poem_stops_reading_a_file_larger_than_it_said(tmp_path: Path) -> None:
    """A file whose size says 0 (as /proc's do) is read no further than the limit."""
    assert os.stat("/proc/self/maps").st_size == 0
    error = poem_error(lambda: read_poem("/proc/self/maps", max_size=16))
    assert str(error) == (
        "cannot load a poem from /proc/self/maps: too big for a poem: "
        "more than the largest poem allowed (16 bytes)"
    )


async def test_service_reload_refuses_a_poem_grown_over_its_limit(tmp_path: Path) -> None:
    """PoetryService passes its max_size to every read."""
    path = tmp_path / "poem.txt"
    path.write_bytes(b"short\n")
    service = PoetryService(str(path), max_size=10)
    async with trio.open_nursery() as nursery:
        await service.start(nursery)
        path.write_bytes(b"much longer now\n")
        with pytest.raises(PoemError, match="too big for a poem: 16 bytes"):
            await service.reload()
        assert service.poem == b"short\n"
        await service.stop()


@pytest.mark.parametrize(
    ("content", "offset", "byte"),
    [
        (b"a fine first line\n\xff then noise\n", 18, 0xFF),
        ("caf\u00e9 au lait\n".encode()[:4], 3, 0xC3),
        ("ok\n".encode() + "é".encode("latin-1") + b"\n", 3, 0xE9),
    ],
    ids=["stray-byte", "truncated-sequence", "latin-1"],
)
def test_read_poem_refuses_invalid_utf8_naming_the_offset(
    tmp_path: Path, content: bytes, offset: int, byte: int
) -> None:
    """Bytes that are not UTF-8 are a PoemError naming the first bad byte and its offset."""
    path = tmp_path / "garbled.txt"
    path.write_bytes(content)
    error = poem_error(lambda: read_poem(str(path)))
    assert str(path) in str(error)
    assert f"not UTF-8 text (byte 0x{byte:02x} at offset {offset})" in str(error)


def test_default_poem_is_a_valid_poem() -> None:
    """The packaged default poem exists, is a regular file, and reads as a poem."""
    assert os.path.isfile(DEFAULT_POEM_PATH)
    poem = read_poem(DEFAULT_POEM_PATH)
    assert poem == Path(DEFAULT_POEM_PATH).read_bytes()
    assert poem.decode("utf-8").strip()


# PoetryService


async def test_service_start_loads_the_poem(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Starting the service reads the file and serves its bytes."""
    path = tmp_path / "poem.txt"
    path.write_bytes("first light on the harbour\n".encode())
    service = PoetryService(str(path))
    assert service.poem == b""
    await service.start(nursery)
    assert service.running is True
    assert service.poem == path.read_bytes()


@pytest.mark.parametrize("content", [None, b"", b"\xff\n"], ids=["missing", "empty", "not-utf8"])
async def test_service_start_with_a_bad_file_raises_and_stays_stopped(
    tmp_path: Path, nursery: trio.Nursery, content: bytes | None
) -> None:
    """A poem that cannot be read makes start raise PoemError and leaves the service stopped."""
    path = tmp_path / "poem.txt"
    if content is not None:
        path.write_bytes(content)
    service = PoetryService(str(path))
    with pytest.raises(PoemError):
        await service.start(nursery)
    assert service.running is False
    assert service.poem == b""


async def test_service_reload_picks_up_a_changed_file(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """reload() serves what the file holds now."""
    path = tmp_path / "poem.txt"
    path.write_bytes(b"the old verse\n")
    service = PoetryService(str(path))
    await service.start(nursery)
    path.write_bytes("the new verse, längér\n".encode())
    await service.reload()
    assert service.poem == "the new verse, längér\n".encode()


@pytest.mark.parametrize("breakage", ["deleted", "emptied", "garbled"])
async def test_service_reload_of_a_broken_file_keeps_the_old_poem(
    tmp_path: Path, nursery: trio.Nursery, breakage: str
) -> None:
    """A reload that fails raises PoemError and the old poem is still served."""
    path = tmp_path / "poem.txt"
    path.write_bytes(b"the verse that stays\n")
    service = PoetryService(str(path))
    await service.start(nursery)
    if breakage == "deleted":
        path.unlink()
    elif breakage == "emptied":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"\xc3\x28 broken\n")
    with pytest.raises(PoemError):
        await service.reload()
    assert service.poem == b"the verse that stays\n"
    assert service.running is True


async def test_service_read_does_not_serve_until_use(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """read() returns the new poem without serving it; use() then serves it."""
    path = tmp_path / "poem.txt"
    path.write_bytes(b"served\n")
    service = PoetryService(str(path))
    await service.start(nursery)
    path.write_bytes(b"read but not yet served\n")
    fresh = await service.read()
    assert fresh == b"read but not yet served\n"
    assert service.poem == b"served\n"
    service.use(fresh)
    assert service.poem == fresh


def test_service_label_is_the_poem_name_or_the_file_basename(tmp_path: Path) -> None:
    """label is the poem's name when given, else the file's base name."""
    path = str(tmp_path / "lantern.txt")
    assert PoetryService(path).label == "lantern.txt"
    assert PoetryService(path, poem_name="evening").label == "evening"
    assert PoetryService(path).name == "poetry"


async def test_a_poem_taken_before_reload_is_unaffected_by_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """A reader holding the poem from before a reload keeps the old bytes."""
    path = tmp_path / "poem.txt"
    path.write_bytes(b"before\n")
    service = PoetryService(str(path))
    await service.start(nursery)
    taken = service.poem
    path.write_bytes(b"after the reload\n")
    await service.reload()
    assert taken == b"before\n"
    assert service.poem == b"after the reload\n"
    assert service.poem is not taken
