"""The documentation: a strict site build, and every code block either run or said why not.

The site (mkdocs.yml, docs/, README.md as its front page, BENCHMARKS.md) builds with
``mkdocs build --strict``: a broken link or anchor, a nav entry without its page or a page left
out of the nav fails it, and copies of the docs with each such fault show that it does. README's
quickstarts and the blocks the pages mark ``<!-- run -->`` are executed as shown, on CPU, in a
temporary directory (tests/helpers/docs.py); every other python or bash block carries
``<!-- not run: REASON -->``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.docs import ROOT, blocks, environment, run_page

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )


def nav_pages() -> list[str]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())  # no !!python tags in it
    return [next(iter(entry.values())) for entry in config["nav"]]


def test_the_site_builds_strictly(tmp_path):
    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    for page in nav_pages():
        built = tmp_path / "site" / ("index.html" if page == "index.md" else page[:-3])
        assert built.exists(), f"{page} was not built"
    # the front page and the benchmarks are the repository's own files, not copies
    assert "Quickstarts" in (tmp_path / "site" / "index.html").read_text()
    assert (tmp_path / "site" / "benchmarks" / "index.html").exists()


def test_every_docs_page_is_in_the_nav_and_linked_from_the_front_page():
    nav = set(nav_pages())
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} | {"index.md", "benchmarks.md"}
    assert nav == pages
    readme = (ROOT / "README.md").read_text()
    for page in nav - {"index.md", "benchmarks.md"}:
        assert f"](docs/{page})" in readme, f"README does not link docs/{page}"
    assert "](BENCHMARKS.md)" in readme


def test_the_readme_is_a_front_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    assert "![" in readme and "](docs/dashboard.png)" in readme
    for command in ("make test", "make demo"):
        assert command in readme


def _fault(root: Path, fault: str) -> str:
    """Damage a copy of the docs one way; the text the build's error must name."""
    if fault == "broken link":
        readme = root / "README.md"
        readme.write_text(readme.read_text().replace("](docs/cli.md)", "](docs/clii.md)", 1))
        return "clii.md"
    if fault == "broken anchor":
        page = root / "docs" / "configuration.md"
        text = page.read_text().replace("models.md#options)", "models.md#optionz)", 1)
        page.write_text(text)
        return "optionz"
    if fault == "nav page missing":
        (root / "docs" / "demo.md").unlink()
        return "demo.md"
    if fault == "page not in the nav":
        (root / "docs" / "orphan.md").write_text("# Orphan\n")
        return "orphan.md"
    raise ValueError(fault)


def _copy(root: Path) -> Path:
    shutil.copytree(ROOT / "docs", root / "docs")
    for name in ("mkdocs.yml", "README.md", "BENCHMARKS.md"):
        shutil.copy(ROOT / name, root / name)
    return root


def test_an_intact_copy_of_the_docs_builds(tmp_path):
    """So the damaged copies below fail for their damage alone."""
    done = build(_copy(tmp_path / "repo"), tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "fault", ["broken link", "broken anchor", "nav page missing", "page not in the nav"]
)
def test_a_damaged_copy_of_the_docs_fails_the_strict_build(tmp_path, fault):
    root = _copy(tmp_path / "repo")
    named = _fault(root, fault)
    done = build(root, tmp_path / "site")
    assert done.returncode != 0, f"the strict build let a {fault} through"
    assert named in done.stdout + done.stderr


def test_every_code_block_is_run_or_says_why_not():
    for page in PAGES:
        for block in blocks(page):
            if block.lang not in ("python", "bash", "sh", "console", "shell", "py"):
                continue
            assert block.lang in ("python", "bash"), f"{block.where()}: say python or bash"
            assert block.marker, f"{block.where()}: mark it <!-- run --> or <!-- not run: why -->"
            if not block.runs:
                assert re.fullmatch(r"not run: \S.{8,}", block.marker), (
                    f"{block.where()}: give the reason it is not run"
                )


def test_the_quickstarts_are_all_run():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Quickstarts")
    end = readme.index("\n## ", start + 1)
    first, last = readme[:start].count("\n") + 1, readme[:end].count("\n") + 1
    quick = [b for b in blocks(ROOT / "README.md") if first <= b.line <= last]
    assert len(quick) >= 4  # the setup and the three quickstarts
    assert all(b.runs for b in quick), [b.where() for b in quick if not b.runs]
    assert {b.lang for b in quick} == {"python", "bash"}


def test_a_block_that_fails_is_reported_with_its_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    ok = "<!-- run -->\n```python\nvalue = 6 * 7\n```\n"
    for bad, said in [
        ("<!-- run -->\n```python\nassert value == 41, 'boom'\n```\n", "boom"),
        ("<!-- run -->\n```bash\necho to-stderr >&2; false\n```\n", "to-stderr"),
    ]:
        page.write_text(f"# Page\n\n{ok}\n{bad}")
        failure = run_page(page, tmp_path)
        assert failure is not None and said in failure
        assert failure.startswith(f"{page}:9:")  # the failing block's fence
    page.write_text(f"# Page\n\n{ok}")
    assert run_page(page, tmp_path) is None


RUN_PAGES = [p for p in PAGES if any(b.runs for b in blocks(p))]


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every page's run blocks, executed once in one process (one import of the stack)."""
    scratch = tmp_path_factory.mktemp("docs-run")
    result = scratch / "result.json"
    pages = [p.relative_to(ROOT).as_posix() for p in RUN_PAGES]
    done = subprocess.run(
        [sys.executable, "-m", "tests.helpers.docs", str(result), *pages],
        cwd=ROOT,
        env=environment(scratch / "bin"),
        capture_output=True,
        text=True,
        timeout=900,  # generous: a loaded CI machine is slow, not hung
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads(result.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_the_documented_code_runs_as_shown(executed, page):
    failure = executed[page.relative_to(ROOT).as_posix()]
    assert failure is None, failure
