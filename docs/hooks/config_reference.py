"""The configuration reference, generated from the dataclasses of `qdiff.config`.

`config_reference()` returns the Markdown of every config block: each field's name,
type, default and the comment written beside it in `qdiff/config.py`, plus the values
`__post_init__` allows where it checks a choice. It needs only qdiff (not mkdocs), so
`tests/test_docs.py` can check that every field of every dataclass is on the page.

mkdocs runs `on_page_markdown` below (registered under `hooks:` in mkdocs.yml): it puts
the generated Markdown where `docs/reference/config.md` holds the marker line.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from typing import Any

MARKER = "<!-- config-reference -->"
# The order of the blocks on the page: RunConfig's own fields first, then its blocks.
BLOCKS = (("", "RunConfig"), ("model", "ModelConfig"), ("quant", "QuantConfig"),
          ("quant.overrides[]", "LayerOverride"), ("lora", "LoRAConfig"), ("aux", "AuxConfig"),
          ("distill", "DistillConfig"), ("export", "ExportConfig"), ("eval", "EvalConfig"))
_CONTINUES = (";", ",", ":")  # a trailing comment ending so goes on in the comment lines below


def config_dataclasses() -> dict[str, type]:
    """Every dataclass defined in `qdiff.config`, by class name."""
    import qdiff.config as module
    return {name: value for name, value in vars(module).items()
            if inspect.isclass(value) and dataclasses.is_dataclass(value)
            and value.__module__ == module.__name__}


def _comments(source: str) -> dict[int, str]:
    """Line number (1-based, within `source`) -> the text of the comment on that line."""
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found[token.start[0]] = token.string.lstrip("#").strip()
    return found


def field_comments(cls: type) -> dict[str, str]:
    """The comment of each field of `cls`: the comment lines just above it, then the one
    at the end of its line (and the comment lines below, where that one ends in ; , or :)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = _comments(source)
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    statements = [node for node in body.body if isinstance(node, ast.AnnAssign)]
    taken: set[int] = set()
    result: dict[str, str] = {}
    for node in statements:
        name = node.target.id  # type: ignore[union-attr]
        trailing = comments.get(node.end_lineno or node.lineno, "")
        below: list[str] = []
        line = (node.end_lineno or node.lineno) + 1
        last = trailing
        while (last.endswith(_CONTINUES) and line <= len(lines)
               and lines[line - 1].strip().startswith("#")):
            last = comments[line]
            below.append(last)
            taken.add(line)
            line += 1
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#") and line not in taken:
            above.insert(0, comments[line])
            line -= 1
        result[name] = " ".join(part for part in (*above, trailing, *below) if part)
    return result


def _allowed(cls: type) -> dict[str, str]:
    """Field -> the values `__post_init__` allows, read from its direct checks:
    `_check_choice(name, self.FIELD, CHOICES)`, `_check_bits(name, self.FIELD)` and
    `_check_range(name, self.FIELD, LOW[, HIGH])`."""
    import qdiff.config as module
    source = textwrap.dedent(inspect.getsource(cls))
    found: dict[str, str] = {}
    tree = ast.parse(source)
    # `for name in ("a", "b"): check(..., getattr(self, name), ...)` checks fields a and b;
    # `for metric in self.metrics: check(..., metric, ...)` checks each item of a field.
    scopes: list[tuple[ast.AST, dict[str, list[str]]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.For) and isinstance(node.target, ast.Name):
            if isinstance(node.iter, ast.Tuple):
                names = [item.value for item in node.iter.elts if isinstance(item, ast.Constant)]
            elif isinstance(node.iter, ast.Attribute):
                names = [node.iter.attr]
            else:
                continue
            scopes.append((node, {node.target.id: names}))
    scopes.append((tree, {}))

    def checked_fields(arg: ast.expr, loops: dict[str, list[str]]) -> list[str]:
        if isinstance(arg, ast.Attribute):
            return [arg.attr]
        if isinstance(arg, ast.Name):
            return loops.get(arg.id, [])
        if (isinstance(arg, ast.Call) and getattr(arg.func, "id", None) == "getattr"
                and len(arg.args) == 2 and isinstance(arg.args[1], ast.Name)):
            return loops.get(arg.args[1].id, [])
        return []

    calls = [(node, loops) for scope, loops in scopes for node in ast.walk(scope)
             if isinstance(node, ast.Call) and len(node.args) >= 2]
    for node, loops in calls:
        names = checked_fields(node.args[1], loops)
        if not names:
            continue
        function = getattr(node.func, "id", None)
        try:
            values = [eval(compile(ast.Expression(arg), "<config>", "eval"), vars(module))
                      for arg in node.args[2:]]
        except Exception:  # a computed bound: leave it to the comment
            continue
        if function == "_check_choice" and len(values) == 1:
            text = ", ".join(f"`{value}`" for value in values[0])
        elif function == "_check_bits":
            text = "{}..{}".format(*module.BITS_RANGE)
        elif function == "_check_range" and values:
            text = f"{values[0]}..{values[1]}" if len(values) > 1 else f">= {values[0]}"
        else:
            continue
        for name in names:
            found.setdefault(name, text)
    return found


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return " | ".join(_type_name(arg) for arg in typing.get_args(hint))
    if origin is list:
        return f"list[{', '.join(_type_name(arg) for arg in typing.get_args(hint))}]"
    return getattr(hint, "__name__", str(hint))


def _default(item: dataclasses.Field) -> str:
    if item.default is not dataclasses.MISSING:
        value = item.default
    elif item.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = item.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(block)"
    if str(value) == "???":  # omegaconf's MISSING
        return "required"
    return f"`{value!r}`" if not isinstance(value, str) else f'`"{value}"`'


def _cell(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def config_reference() -> str:
    """The Markdown of the configuration reference: one table per config dataclass."""
    classes = config_dataclasses()
    listed = [name for _, name in BLOCKS]
    blocks = list(BLOCKS) + [(name, name) for name in classes if name not in listed]
    out: list[str] = []
    for prefix, class_name in blocks:
        cls = classes.get(class_name)
        if cls is None:
            continue
        title = f"`{prefix}`" if prefix else "top level"
        out.append(f"## {title}: `{class_name}`\n")
        doc = inspect.getdoc(cls) or ""
        if doc and not doc.startswith(class_name + "("):
            out.append(doc.splitlines()[0] + "\n")
        out.append("| key | type | default | what it does |")
        out.append("|---|---|---|---|")
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        allowed = _allowed(cls)
        for item in dataclasses.fields(cls):
            key = f"{prefix}.{item.name}" if prefix else item.name
            text = comments.get(item.name, "")
            if item.name in allowed:
                text = (text.rstrip(".") + ". " if text else "") + f"Allowed: {allowed[item.name]}."
            if dataclasses.is_dataclass(hints[item.name]):
                text = text or f"the `{hints[item.name].__name__}` block below"
            out.append(f"| `{key}` | `{_type_name(hints[item.name])}` | {_default(item)} | "
                       f"{_cell(text) or '—'} |")
        out.append("")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs hook: fill the marker of the configuration reference page."""
    if MARKER in markdown:
        return markdown.replace(MARKER, config_reference())
    return markdown
