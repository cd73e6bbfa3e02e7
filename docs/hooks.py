"""MkDocs hook: README.md and BENCHMARKS.md, kept at the repository root, become site pages.

README.md is the site's ``index.md`` and BENCHMARKS.md its ``benchmarks.md``. Links are written
for GitHub (README links ``docs/protocol.md``; a page in docs/ links ``../BENCHMARKS.md``) and
rewritten here to the site's pages, so one file serves both and the strict build checks every
link of README too.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
# repository path -> site page
ROOT_PAGES = {"README.md": "index.md", "BENCHMARKS.md": "benchmarks.md"}
LINK = re.compile(r"(\]\()([^)\s]+)")


def on_files(files: Files, config: Any) -> Files:
    """Add the root pages to the site."""
    for repo_path, page in ROOT_PAGES.items():
        files.append(File.generated(config, page, abs_src_path=str(ROOT / repo_path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Rewrite repository-relative links of a page to the site's paths."""
    at_root = page.file.src_uri in ROOT_PAGES.values()  # written relative to the repo root
    here = "" if at_root else "docs"

    def site_path(match: re.Match[str]) -> str:
        target = match.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:|#", target):  # a URL, an anchor of this page
            return match.group(0)
        path, _, anchor = target.partition("#")
        repo_path = posixpath.normpath(posixpath.join(here, path))
        if repo_path in ROOT_PAGES:
            path = ROOT_PAGES[repo_path]
        elif repo_path.startswith("docs/"):
            path = repo_path.removeprefix("docs/")
        else:
            return match.group(0)  # outside the site: left for the strict build to report
        return match.group(1) + path + (f"#{anchor}" if anchor else "")

    return LINK.sub(site_path, markdown)
