"""The docs stay true to the code.

- The configuration reference, generated from `qdiff.config`'s dataclasses, lists every
  field of every config dataclass (so a new field cannot be left out of the docs).
- Every fenced ```python block under docs/ runs, unless an HTML comment
  `<!-- no-test: REASON -->` stands just before it (CONTRIBUTING.md): the blocks of one
  page run in order in one namespace, from the repository root, on the embedded assets.
- Links from the docs to repository files point at files that exist.
- `mkdocs build --strict` passes (skipped where mkdocs is not installed: `pip install -e
  ".[docs]"`).

Only the last test needs mkdocs; the others import the generator as a plain module.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
NO_TEST = re.compile(r"<!--\s*no-test:\s*(\S[^>]*?)\s*-->\s*$")


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """(line, code, no-test reason or None) of every ```python block of a page."""
    blocks = []
    for match in FENCE.finditer(text):
        if match.group(1) != "python":
            continue
        before = [line for line in text[:match.start()].splitlines() if line.strip()]
        marker = NO_TEST.match(before[-1].strip()) if before else None
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(2), marker.group(1) if marker else None))
    return blocks


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def test_the_config_reference_lists_every_field_of_every_config_dataclass():
    generator = _hook("config_reference")
    page = generator.config_reference()
    sections = re.split(r"^## ", page, flags=re.M)[1:]
    by_class = {re.search(r": `(\w+)`", section.splitlines()[0]).group(1): section
                for section in sections}
    classes = generator.config_dataclasses()
    assert {"RunConfig", "ModelConfig", "QuantConfig", "LayerOverride", "LoRAConfig",
            "AuxConfig", "DistillConfig", "ExportConfig", "EvalConfig"} <= set(classes)
    for name, cls in classes.items():
        assert name in by_class, f"{name} has no section in the configuration reference"
        keys = re.findall(r"^\| `([^`]+)` \|", by_class[name], flags=re.M)
        leaves = [key.rsplit(".", 1)[-1] for key in keys]
        assert leaves == [item.name for item in dataclasses.fields(cls)], name


def test_the_config_reference_reads_the_comments_and_the_checks():
    page = _hook("config_reference").config_reference()
    row = next(line for line in page.splitlines() if line.startswith("| `distill.base_weight_lr`"))
    assert "0 keeps them frozen" in row and "full QAT" in row  # a comment that goes on below
    row = next(line for line in page.splitlines() if line.startswith("| `distill.loss`"))
    assert "raw output" in row and "clean samples" in row and "Allowed: `x0`, `mse`, `l1`" in row
    assert "| `quant.weight_bits` | `int` | `4` | Allowed: 2..8. |" in page


def test_the_config_page_holds_the_generator_marker():
    generator = _hook("config_reference")
    assert generator.MARKER in (DOCS / "reference" / "config.md").read_text()


def test_every_python_block_is_run_or_says_why_not():
    pages = {page: python_blocks(page.read_text(encoding="utf-8")) for page in doc_pages()}
    assert any(reason is None for blocks in pages.values() for _, _, reason in blocks)
    for page, blocks in pages.items():
        for line, _code, reason in blocks:
            assert reason is None or len(reason) > 3, f"{page}:{line}: say why it is not tested"


@pytest.mark.parametrize("page", [p for p in doc_pages()
                                  if any(r is None for _, _, r in python_blocks(p.read_text()))],
                         ids=lambda p: str(p.relative_to(DOCS)))
def test_python_blocks_run(page, monkeypatch, one_thread):
    monkeypatch.chdir(REPO_ROOT)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, code, reason in python_blocks(page.read_text(encoding="utf-8")):
        if reason is None:
            exec(compile(code, f"{page}:{line}", "exec"), namespace)


def test_links_to_repository_files_exist():
    links = _hook("repo_links")
    for page in doc_pages():
        problems: list[str] = []
        src = page.relative_to(DOCS).as_posix()
        links.rewrite(page.read_text(encoding="utf-8"), src, DOCS, None, problems)
        assert not problems, f"{src}: {problems}"


def test_a_link_to_a_missing_repository_file_is_reported_and_others_rewritten():
    links = _hook("repo_links")
    problems: list[str] = []
    text = ("[`finetune.md`](../../eval/results/quality/finetune.md) [gone](../../eval/results/nope.md) "
            "![plot](../../eval/results/speed/speed.png) [page](../guides/video.md)")
    out = links.rewrite(text, "notes/log.md", DOCS, None, problems)
    assert problems == ["links to '../../eval/results/nope.md', but eval/results/nope.md is "
                        "not in the repository"]
    assert "`eval/results/quality/finetune.md`" in out and "](../_repo/eval/results/speed/speed.png)" in out
    assert "[page](../guides/video.md)" in out
    out = links.rewrite(text, "notes/log.md", DOCS, "https://example.org/qdiff", [])
    assert "(https://example.org/qdiff/blob/HEAD/eval/results/quality/finetune.md)" in out


def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": "1"}
    mkdocs = [sys.executable, "-m", "mkdocs"]
    result = subprocess.run([*mkdocs, "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    config_page = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "distill.ema_ramp" in config_page and "config-reference" not in config_page


def test_every_test_the_reliability_page_cites_exists():
    """The reliability table names the test that pins each row: a renamed or deleted test
    would leave a row that nothing pins."""
    page = (REPO_ROOT / "docs" / "reliability.md").read_text()
    cited = set(re.findall(r"\b(test_\w+)\b(?!\.py)", page))
    defined = set()
    for path in (REPO_ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    assert len(cited) >= 20
    assert sorted(cited - defined) == []
