"""The configuration reference page, ``docs/configuration.md``, generated from the schema.

    python -m mlproject.config.reference --write     # rewrite docs/configuration.md
    python -m mlproject.config.reference             # print the page

Every key of :class:`~mlproject.config.schema.Config`, section by section, with its type (and
bounds), its default and its description (the field's ``description`` or the docstring under
the attribute), then the instrument presets of :mod:`mlproject.instruments`. The schema is the
one home of the defaults; ``tests/test_config_reference.py`` fails when the committed page is not
what this prints.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mlproject.config.schema import Config
from mlproject.instruments import CONTRACT_NAMES, PRESETS

PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
"""Where ``--write`` puts the page (``docs/configuration.md`` of this checkout)."""

_INTRO = """\
# Configuration reference

<!-- Generated from mlproject/config/schema.py and mlproject/instruments.py by
     `python -m mlproject.config.reference --write`: edit those, then regenerate. -->

One validated configuration per run, loaded from a YAML file (`--config conf/default.yaml`, the
real-use settings; `conf/smoke.yaml`, the tests' and the demo's tiny profile) with
`--set key=value` overrides on top (`--set env.instrument=NQ --set env.window=64`). A key left
out takes the default below; an unknown key or a wrong type is an error that names the key, the
file and the line. Every run logs its resolved configuration as `config.yaml` and as params.
"""

_PRESETS_INTRO = """\
## Instrument presets

`env.instrument` names one of these, or gives every field, or a preset plus the fields that
differ: `env.instrument: {preset: NQ, commission_per_side: 1.9, max_contracts: 2}`. Tick size and
point value are the exchange's contract specs; the commission is a typical retail all-in round
turn in USD, charged half per side; slippage is one tick a fill and `max_contracts` is 1. Put your
account's rates in the configuration.
"""


@dataclass(frozen=True)
class Key:
    """One row of the reference: a leaf key of the configuration."""

    name: str
    type: str
    default: Any
    description: str


@dataclass(frozen=True)
class Section:
    """A model of the schema at a dotted path, its leaf keys and its nested sections."""

    path: str
    description: str
    keys: list[Key]
    sections: list[Section]


def one_line(text: str | None) -> str:
    """``text`` with its whitespace runs (line breaks included) made single spaces."""
    return " ".join((text or "").split())


def attribute_docs(model: type[BaseModel]) -> dict[str, str]:
    """The docstrings under the annotated attributes of ``model``'s own class body, one line each."""
    body = ast.parse(textwrap.dedent(inspect.getsource(model))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = one_line(after.value.value)
    return docs


def type_name(annotation: Any) -> str:
    """How a field's type reads in the reference: ``int``, ``float or null``, ``one of a, b``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", "min_length": "length >="}


def bounds(field: FieldInfo) -> str:
    """The field's bounds (``>= 1, < 1``), from its ``Field(ge=..., ...)`` metadata."""
    found = [f"{sign} {getattr(item, name):g}" for item in field.metadata
             for name, sign in _BOUNDS.items() if getattr(item, name, None) is not None]
    return ", ".join(found)


def yaml_value(value: Any) -> str:
    """``value`` as it is written in a YAML file (``null``, ``true``, ``[64, 64]``, ``'2024-01-02'``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1_000).removesuffix("\n...\n").strip()


def section(value: BaseModel, path: str = "", note: str = "") -> Section:
    """The reference of the model ``value`` (its defaults) at the dotted ``path`` (``""``: the
    top level); ``note`` is the parent's description of the field that holds it."""
    model = type(value)
    docs, keys, sections = attribute_docs(model), [], []
    for name, field in model.model_fields.items():
        dotted, default = f"{path}.{name}" if path else name, getattr(value, name)
        description = one_line(field.description) or docs.get(name, "")
        if isinstance(default, BaseModel):
            sections.append(section(default, dotted, description))
            continue
        kind = type_name(field.annotation) + (f", {bounds(field)}" if bounds(field) else "")
        keys.append(Key(dotted, kind, default, description))
    return Section(path, one_line(f"{model.__doc__ or ''} {note}"), keys, sections)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def section_markdown(sec: Section, depth: int = 2) -> list[str]:
    """Markdown lines of ``sec``: a heading, its description, a table of its keys, its sections."""
    lines = [f"{'#' * depth} {f'`{sec.path}`' if sec.path else 'Top level'}", ""]
    if sec.description:
        lines += [_cell(sec.description), ""]
    if sec.keys:
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        lines += [f"| `{k.name}` | {_cell(k.type)} | `{_cell(yaml_value(k.default))}` | {_cell(k.description)} |"
                  for k in sec.keys]
        lines.append("")
    for sub in sec.sections:
        lines += section_markdown(sub, min(depth + 1, 4))
    return lines


def presets_markdown() -> list[str]:
    """The instrument presets table (:data:`mlproject.instruments.PRESETS`)."""
    lines = [_PRESETS_INTRO, "| preset | contract | tick size | point value | tick value | round turn |",
             "|---|---|---|---|---|---|"]
    for symbol, spec in PRESETS.items():
        lines.append(f"| `{symbol}` | {CONTRACT_NAMES[symbol]} | {spec.tick_size:g} | {spec.point_value:,g} | "
                     f"{spec.tick_value:,.4g} | {2 * spec.commission_per_side:.2f} |")
    return lines + [""]


def reference_markdown() -> str:
    """The whole page: every key of :class:`Config`, then the instrument presets."""
    top = section(Config())
    lines = [_INTRO, *section_markdown(Section("", "", top.keys, []))]
    for sec in top.sections:
        lines += section_markdown(sec)
    return "\n".join(lines + presets_markdown()).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlproject.config.reference", description=__doc__.split("\n")[0])
    parser.add_argument("--write", nargs="?", const=str(PAGE), metavar="PATH",
                        help=f"write the page to PATH (default {PAGE.relative_to(PAGE.parents[1])}) instead of printing it")
    args = parser.parse_args(argv)
    text = reference_markdown()
    if args.write is None:
        sys.stdout.write(text)
    else:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
