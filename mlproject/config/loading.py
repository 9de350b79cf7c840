"""Loading the configuration: YAML files, ``--set key=value`` overrides, and errors that name
the key, the file and the line (or the ``--set`` that caused them)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from mlproject.config.base import ConfigError
from mlproject.config.schema import Config

log = logging.getLogger(__name__)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load ``path`` (None: embedded defaults) and apply ``key.sub=value`` overrides.

    Override values are parsed as YAML scalars/flow collections, so ``env.window=16`` is an int
    and ``env.instrument={preset: ES, max_contracts: 2}`` a mapping.
    """
    source = str(path) if path is not None else "<defaults>"
    text, raw = _read_mapping(Path(path), source) if path is not None else ("", {})
    # Overrides refine what the file set (--set env.instrument.max_contracts=2 keeps the file's
    # preset); the defaults fill in the rest afterwards. In that order an instrument field given
    # without any preset is a partial custom spec (an error naming what is missing), never the
    # default ES with one field changed. Validation still reports the file's unknown keys.
    override_keys = set()
    for item in overrides:
        key = _apply_override(raw, item)
        override_keys.add(key)
    raw = _merge(Config().to_dict(), raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source, text, override_keys)) from None


def _read_mapping(path: Path, source: str) -> tuple[str, dict[str, Any]]:
    """(the file's text, its settings): an empty file is no settings; a top level that is not a
    mapping is a ConfigError."""
    text = _read(path)
    loaded = _parse_yaml(text, source)
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(loaded).__name__}")
    return text, loaded or {}


def config_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Validate an already-parsed mapping (e.g. a logged ``config.yaml``)."""
    try:
        return Config.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        # An instrument mapping is a whole contract: it replaces the default (ES) rather than
        # inheriting its preset, so {tick_size: ..., ...} really is a custom contract.
        if isinstance(value, Mapping) and isinstance(out.get(key), dict) and key != "instrument":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path}: is a folder, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path}: not a text (UTF-8) YAML file (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot be read: {exc.strerror}") from None


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's floats: ``1e-4`` and ``-1e9`` are numbers (PyYAML, YAML 1.1, reads a
    float without a dot as a string, which the strict schema then refuses)."""


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader with one more float form


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return _load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None


def _apply_override(raw: dict[str, Any], item: str) -> str:
    key, sep, value_text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. env.instrument=NQ")
    try:
        value = _load(value_text) if value_text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {value_text!r} is not valid YAML ({exc})") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "instrument":
            child = {"preset": child}  # lets --set env.instrument.max_contracts=2 refine a preset
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value
    return key


def describe_validation_error(exc: ValidationError, source: str, text: str = "",
                              override_keys: set[str] | frozenset[str] = frozenset()) -> str:
    """A pydantic ValidationError as lines ``<where>: key '<dotted key>': <problem>``."""
    lines: dict[str, list[str]] = {}
    for err in exc.errors():
        key = _clean_loc(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")  # our own validators' messages say it all
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        lines.setdefault(key, [])
        if msg not in lines[key]:
            lines[key].append(msg)
    parts = []
    for key, msgs in lines.items():
        where = _where(key, source, text, override_keys)
        parts.append(f"{where}: key '{key}': {'; or '.join(msgs)}")
    return "invalid configuration:\n  " + "\n  ".join(parts)


def _clean_loc(loc: tuple[Any, ...]) -> str:
    """Drop pydantic's union-member tags ('str', 'function-after[...]') from an error location."""
    model: type[BaseModel] | None = Config
    keep: list[str] = []
    for part in loc:
        if model is None:
            keep.append(str(part))
            continue
        if isinstance(part, str) and part in model.model_fields:
            keep.append(part)
            annotation = model.model_fields[part].annotation
            model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        elif isinstance(part, str) and part not in ("str", "int", "float", "bool", "none") and not part.startswith(
            ("function-", "constrained-")
        ) and not (part[:1].isupper()):
            keep.append(part)  # an unknown key: report it as written
            model = None
    return ".".join(keep) or "<root>"


def _where(key: str, source: str, text: str, override_keys: set[str]) -> str:
    given = [k for k in override_keys if key == k or key.startswith(k + ".") or k.startswith(key + ".")]
    if given:
        return f"--set {key}" if key in given or len(given) > 1 else f"--set {given[0]}"
    line = _line_of(text, key.split(".")) if text else None
    return f"{source} line {line}" if line else source


def _line_of(text: str, parts: list[str]) -> int | None:
    """1-based line of a dotted key in YAML text (the deepest part found), or None."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return None
    line = None
    for part in parts:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == part:
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return line
