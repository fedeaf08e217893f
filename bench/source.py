"""The fastpoetry a run measures: a copy of ``src/fastpoetry`` taken as the run starts.

Every fastpoetry server of a run imports this copy, so all of its rows
measure the same code even if the work tree changes while the run goes
on (a full run takes about ten minutes).  The copy's content hash goes
into the results, beside the commit it started from.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path


def snapshot(package: Path, into: Path) -> str:
    """Copy the package directory ``package`` into ``into``; return a short hash of what was copied."""
    target = into / package.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    digest = hashlib.sha256()
    for file in sorted(path for path in target.rglob("*") if path.is_file()):
        digest.update(file.relative_to(target).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()[:12]
