"""Links from the docs to the repository's own files (eval/results/*, configs/*, sources).

The pages link such files relatively, e.g. `[finetune.md](../../eval/results/quality/finetune.md)`
from `docs/notes/`, so the links work when the Markdown is read in the repository. Those
files are outside `docs_dir`, where mkdocs cannot follow them, so this hook (registered in
mkdocs.yml) rewrites them for the site, and still checks them:

- a target that does not exist in the repository is a warning, which `mkdocs build
  --strict` turns into a failure, as for a broken link between pages;
- an image is copied into the site (`_repo/<path>`) and shown;
- any other file becomes a link to it on the code host when mkdocs.yml sets `repo_url`
  (`<repo_url>/blob/HEAD/<path>`), else the repository path as code text.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.repo_links")
LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(([^()\s]+)\)")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg")
SITE_FOLDER = "_repo"


def _repo_root(config: Any) -> Path:
    return Path(config["docs_dir"]).resolve().parent


def repo_target(page_src: str, target: str, docs_dir: Path) -> str | None:
    """The repository path (POSIX, from the root) a page's link points to when it leaves
    docs_dir; None for links inside the docs, URLs and anchors."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path = target.split("#", 1)[0]
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(page_src), path))
    if not joined.startswith("../"):
        return None
    root_relative = (Path(docs_dir.name) / joined).as_posix()
    return posixpath.normpath(root_relative)


def rewrite(markdown: str, page_src: str, docs_dir: Path, repo_url: str | None,
            problems: list[str]) -> str:
    """The page's Markdown with its links to repository files rewritten for the site."""
    root = docs_dir.parent
    depth = page_src.count("/")

    def replace(match: re.Match[str]) -> str:
        bang, text, target = match.groups()
        path = repo_target(page_src, target, docs_dir)
        if path is None:
            return match.group(0)
        if not (root / path).exists():
            problems.append(f"links to '{target}', but {path} is not in the repository")
            return match.group(0)
        if bang or path.lower().endswith(IMAGE_SUFFIXES):
            local = "../" * depth + f"{SITE_FOLDER}/{path}"
            return f"{bang}[{text}]({local})"
        if repo_url:
            anchor = target[len(target.split("#", 1)[0]):]
            return f"[{text}]({repo_url.rstrip('/')}/blob/HEAD/{path}{anchor})"
        plain = text.strip("`")
        if plain in (path, posixpath.basename(path)):
            return f"`{path}`"
        return f"{text} (`{path}`)"

    return LINK.sub(replace, markdown)


def images(markdown: str, page_src: str, docs_dir: Path) -> set[str]:
    """The repository paths of the images a page shows from outside docs_dir."""
    found = set()
    for bang, _text, target in LINK.findall(markdown):
        path = repo_target(page_src, target, docs_dir)
        if path and (bang or path.lower().endswith(IMAGE_SUFFIXES)):
            found.add(path)
    return found


def on_files(files: Any, config: Any) -> Any:
    """Copy the repository images the pages show into the site, under _repo/."""
    from mkdocs.structure.files import File

    docs_dir = Path(config["docs_dir"]).resolve()
    wanted: set[str] = set()
    for file in files.documentation_pages():
        wanted |= images(Path(file.abs_src_path).read_text(encoding="utf-8"), file.src_uri,
                         docs_dir)
    for path in sorted(wanted):
        source = docs_dir.parent / path
        if source.is_file():
            files.append(File.generated(config, f"{SITE_FOLDER}/{path}",
                                        abs_src_path=str(source)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    problems: list[str] = []
    result = rewrite(markdown, page.file.src_uri, Path(config["docs_dir"]).resolve(),
                     config.get("repo_url"), problems)
    for problem in problems:
        log.warning("Doc file '%s' %s.", page.file.src_uri, problem)
    return result
