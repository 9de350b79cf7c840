"""The documentation: a short README and an MkDocs site in docs/ that builds strictly.

The strict build fails on a broken link or anchor between pages and on a page missing from the nav
(``mkdocs.yml``: ``strict: true`` and ``validation`` warnings); the README is not part of the site,
so its own links are checked here. Which commands of the pages run is ``tests/test_readme.py``'s job.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200


def _nav_pages(nav: list) -> list[str]:
    """The page files of an MkDocs nav (nested sections flattened)."""
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert (site / "index.html").is_file() and (site / "seed-names" / "index.html").is_file()


def test_every_page_is_in_the_nav_and_the_build_is_strict():
    config = _config()
    assert config["strict"] is True and config["docs_dir"] == "docs"
    assert not Path(config["site_dir"]).is_relative_to("docs"), "the site is built outside docs/"
    listed = _nav_pages(config["nav"])
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert sorted(listed) == pages, f"not in the nav: {set(pages) - set(listed)}; no such page: {set(listed) - set(pages)}"
    assert {"quickstart.md", "benchmarks.md", "configuration.md", "seed-names.md"} <= set(listed)


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, "the README is the one-minute version: details go in docs/"
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert "docs/quickstart.md" in links and "docs/seed-names.md" in links
    broken = [link for link in links if "://" not in link and not (ROOT / link).is_file()]
    assert not broken, f"README links to missing files: {broken}"
