"""The README's Robustness table names tests that exist.

Each row says where its behaviour is tested; a renamed or removed test
would leave the table claiming something no test shows.
"""

from __future__ import annotations

import re

from helpers import REPO

TESTS = REPO / "tests"


def _robustness_rows() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("\n## Robustness\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]


def _references(cell: str) -> list[tuple[str, str | None]]:
    """``(file, test or None)`` for each backticked name; ``::name`` continues the last file."""
    found: list[tuple[str, str | None]] = []
    current = ""
    for name in re.findall(r"`([^`]+)`", cell):
        if name.startswith("::"):
            found.append((current, name[2:]))
            continue
        path, _, test = name.partition("::")
        if not path.startswith("test") and not path.startswith("system/") and "/" not in path:
            continue  # not a test reference
        current = path
        found.append((path, test or None))
    return found


def test_robustness_table_names_only_tests_that_exist() -> None:
    rows = _robustness_rows()
    assert len(rows) >= 11, "the table lost rows"
    checked = 0
    for row in rows:
        tested_in = row.rstrip(" |").rsplit(" | ", 1)[1]
        references = _references(tested_in)
        assert references, f"a row names no test: {row}"
        for path, test in references:
            file = TESTS / path
            assert file.is_file(), f"{path} does not exist (row: {row[:60]}...)"
            if test is not None:
                pattern = rf"^(async )?def {re.escape(test)}\("
                assert re.search(pattern, file.read_text(), re.MULTILINE), f"no {test} in {path}"
            checked += 1
    assert checked > 30
