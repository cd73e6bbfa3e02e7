"""docs/guarantees.md's promise table names tests that exist: a renamed or deleted one fails."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_the_promise_table_names_exists():
    page = (ROOT / "docs" / "guarantees.md").read_text()
    start = page.index("## Promises, and the tests that keep them")
    table = page[start : page.index("\n## ", start + 1)]
    named = re.findall(r"`(test_\w+\.py)::(\w+)(?:\[([\w-]+)\])?`", table)
    assert len(named) >= 30
    for file, test, case in named:
        source = (ROOT / "tests" / file).read_text()
        assert re.search(rf"^def {test}\(", source, re.M), f"{file}::{test} is not a test"
        if case:
            assert f'"{case}"' in source, f"{file}::{test}[{case}] is not one of its cases"
