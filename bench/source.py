"""The fastpoetry a run measures: a copy of ``src/fastpoetry`` taken as the run starts.

Every fastpoetry server of a run imports this copy, so all of its rows
measure the same code even if the work tree changes while the run goes
on (a full run takes about ten minutes).  The copy's content hash goes
into the results, beside the commit it started from.

``--baseline REV`` adds a second copy, of ``src/fastpoetry`` as it was at
a git commit, so that one run can measure an old tree and a new one side
by side, in the same rounds.  Both copies are hashed the same way: equal
hashes mean the two rows ran the same code.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

#: Where the package lives in the repository, at any commit.
PACKAGE_PATH = "src/fastpoetry"


class BadRevision(Exception):
    """A --baseline that names no commit of this repository, or one without the package: one line of why."""


@dataclass(frozen=True)
class Revision:
    """A commit-ish resolved: as the user gave it, and the commit it names."""

    given: str
    commit: str  # full hash

    @property
    def short(self) -> str:
        return self.commit[:7]


def snapshot(package: Path, into: Path) -> str:
    """Copy the package directory ``package`` into ``into``; return a short hash of what was copied."""
    target = _fresh(into / package.name)
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return content_hash(target)


def content_hash(target: Path) -> str:
    """A short hash of a directory's files, names and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for file in sorted(path for path in target.rglob("*") if path.is_file()):
        digest.update(file.relative_to(target).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def resolve(repo: Path, rev: str) -> Revision:
    """The commit ``rev`` names in ``repo``, checked to hold src/fastpoetry; BadRevision if not.

    Done before anything is measured, so a typo costs a line, not a run.
    """
    # --end-of-options: a REV that starts with "-" is a name, not an option.
    commit = _git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    if not commit:
        raise BadRevision(f"--baseline {rev}: not a commit of {repo}")
    if _git(repo, "cat-file", "-t", f"{commit}:{PACKAGE_PATH}") != "tree":
        raise BadRevision(f"--baseline {rev}: commit {commit[:7]} has no {PACKAGE_PATH}/")
    return Revision(rev, commit)


def snapshot_revision(repo: Path, revision: Revision, into: Path) -> str:
    """Write src/fastpoetry as it is at ``revision`` into ``into``; return its hash (as snapshot's).

    ``git archive`` of the package's tree: the committed files only, as a
    checkout would have them, without touching the work tree or the index.
    """
    target = _fresh(into / Path(PACKAGE_PATH).name)
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", "--format=tar", f"{revision.commit}:{PACKAGE_PATH}"],
        capture_output=True, stdin=subprocess.DEVNULL, check=True,
    )  # fmt: skip
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        # The archive comes from this repository's own commit; "data" (where
        # this Python has it) still refuses links and paths out of target.
        if hasattr(tarfile, "data_filter"):
            tar.extractall(target, filter="data")
        else:
            tar.extractall(target)
    return content_hash(target)


def _fresh(target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    return target


def _git(repo: Path, *args: str) -> str:
    """Standard output of a git command, stripped; "" if it fails."""
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
    )
    return done.stdout.strip() if done.returncode == 0 else ""
