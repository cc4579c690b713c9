"""mkdocs hooks (``hooks:`` in mkdocs.yml): the site is built from the repository as GitHub shows it.

- ``README.md`` is the site's home page, ``tutorials/NN_*.ipynb`` its tutorials (rendered with their saved outputs
  by mkdocs-jupyter), ``CHANGELOG.md`` its changelog: added from outside ``docs/`` without copies.
- Links are written as they work on GitHub (README: ``docs/tuned_lens.md``, ``tutorials/01_logit_lens.ipynb``; a
  page in docs/: ``../tutorials/02_tuned_lens.ipynb``, ``../README.md``) and rewritten here to where those files sit
  on the site. ``mkdocs build --strict`` then checks every one of them.
- The "Tutorials" section of the nav lists every ``tutorials/NN_*.ipynb`` in order, so a new tutorial appears
  without editing mkdocs.yml.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = {"README.md": "index.md", "CHANGELOG.md": "changelog.md"}  # repository path -> site path
LINK = re.compile(r"(\]\()([^)\s#]+)((?:#[^)\s]*)?\))")


def _tutorials() -> list[str]:
    return [f"tutorials/{p.name}" for p in sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.ipynb"))]


def _repo_to_site(path: str) -> str | None:
    """Where the repository file ``path`` is on the site (None: not on the site)."""
    if path.startswith("docs/"):
        return path[len("docs/"):]
    if path in OUTSIDE:
        return OUTSIDE[path]
    if path in _tutorials():
        return path
    return None


def _site_to_repo(uri: str) -> str:
    back = {v: k for k, v in OUTSIDE.items()}
    return back.get(uri) or (uri if uri.startswith("tutorials/") else f"docs/{uri}")


def on_config(config):
    for item in config["nav"] or []:
        if isinstance(item, dict) and "Tutorials" in item:
            item["Tutorials"] = _tutorials()
    return config


@event_priority(100)  # before mkdocs-jupyter turns the notebooks into pages
def on_files(files, config):
    for repo, site in OUTSIDE.items():
        files.append(File.generated(config, site, abs_src_path=str(ROOT / repo)))
    for path in _tutorials():  # a plain file of the repository (mkdocs-jupyter wraps it; a generated one it cannot)
        files.append(File(path, str(ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    """Rewrite the page's relative links from repository paths to site paths."""
    here = posixpath.dirname(_site_to_repo(page.file.src_uri))
    site_dir = posixpath.dirname(page.file.src_uri)

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("/"):
            return m.group(0)  # a URL, or an absolute path: as written
        repo = posixpath.normpath(posixpath.join(here, target))
        site = _repo_to_site(repo)
        if site is None:
            return m.group(0)  # not on the site: --strict reports it
        return m.group(1) + posixpath.relpath(site, site_dir or ".") + m.group(3)

    return LINK.sub(fix, markdown)
