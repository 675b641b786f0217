"""Typed dataclass fields: what their metadata says, values from YAML and CLI text, flags.

A field declared with `setting` carries a description, its range (numbers), its choices
(strings) and which stages' outputs it changes; validation, CLI flags, fingerprints and
the chart's values schema (tests/chart_schema.py) read them. Nothing here knows the
pipeline.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

from skinlesion import userinput
from skinlesion.errors import ConfigError

C = TypeVar("C")
_YAML_TRUE = ("on", "yes", "true")
_YAML_FALSE = ("off", "no", "false")
_NUMBER = r"-?\d+(?:\.\d+)?"
_INTERVAL = re.compile(rf"([\[(])({_NUMBER}), ({_NUMBER})([\])])")
_ABOVE = re.compile(rf"(>=?) ({_NUMBER})")


@dataclass(frozen=True)
class Range:
    """The values a number field takes; `Range.parse` reads them as messages write them:
    "[1, 4096]", "[0, 0.5)", "(0, 1)", "> 0", ">= 0"."""

    text: str  # as messages say it: "in [1, 4096]", "> 0"
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    @classmethod
    def parse(cls, text: str) -> Range:
        if m := _INTERVAL.fullmatch(text):
            return cls(f"in {text}", float(m[2]), float(m[3]), m[1] == "(", m[4] == ")")
        if m := _ABOVE.fullmatch(text):
            return cls(text, float(m[2]), low_open=m[1] == ">")
        raise ValueError(f"not a range: {text!r}")

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return above and (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        return self.text


def setting(
    default: Any,
    doc: str,
    within: str | None = None,
    *,
    choices: tuple[str, ...] | None = None,
    output: bool | tuple[str, ...] = True,
) -> Any:
    """A config field with its description. `within`: its range (`Range.parse`), checked
    by `check_ranges`. `choices`: the values of a str field (it reads as a Literal of
    them) or of a tuple field's items (for the chart's schema; the section's validate
    checks those). `output`: whether it changes the outputs of the stages that read its
    section (True), of none (False: only how fast the work runs) or only of those named."""
    meta = {"doc": doc, "range": Range.parse(within) if within else None, "choices": choices}
    return field(default=default, metadata={**meta, "output": output})


def field_doc(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("doc", ""))


def field_range(f: dataclasses.Field[Any]) -> Range | None:
    return f.metadata.get("range")


def field_choices(f: dataclasses.Field[Any], hint: Any) -> tuple[Any, ...] | None:
    """The values a field (or each of its items) may take: its Literal's or its `choices`."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    given = f.metadata.get("choices")
    return tuple(given) if given is not None else None


def changes_output(f: dataclasses.Field[Any], stage: str) -> bool:
    """Whether the field goes into the fingerprint of `stage` (a stage reading its section)."""
    output = f.metadata.get("output", True)
    return output if isinstance(output, bool) else stage in output


def field_types(cls: type) -> dict[str, Any]:
    """Each field's type; a str field with `choices` reads as the Literal of them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        given = f.metadata.get("choices")
        if given is not None and hints[f.name] is str:
            hints[f.name] = Literal[tuple(given)]
    return hints


def check_ranges(obj: Any, path: str = "") -> None:
    """Every number field of a config dataclass is inside its range (`path`: "train.")."""
    for f in dataclasses.fields(obj):
        if (span := field_range(f)) and not span.holds(value := getattr(obj, f.name)):
            raise ConfigError(f"{path}{f.name}", f"must be {span}, got {value}")


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or fail naming the field."""
    origin = get_origin(hint)
    if origin is Literal:
        options = get_args(hint)
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no/true/false as booleans
            words = _YAML_TRUE if value else _YAML_FALSE
            named = [c for c in options if isinstance(c, str) and c.lower() in words]
            value = named[0] if len(named) == 1 else value
        if value not in options:
            raise ConfigError(name, f"must be one of {', '.join(map(str, options))}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(name, f"must be a list, got {value!r}")
        return tuple(_coerce(v, get_args(hint)[0], name) for v in value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(name, "union types are not supported in config")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(name, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(name, f"must be an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"must be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(name, f"must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(name, f"must be a finite number, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(name, f"must be a string, got {value!r}")
        return str(value)
    raise ConfigError(name, f"unsupported type {hint!r}")


def build(
    cls: type[C], values: Mapping[str, Any] | None, base: C | None = None, path: str = ""
) -> C:
    """Build a (nested) config dataclass from a mapping over `base` (or the defaults)."""
    values = values or {}
    if not isinstance(values, Mapping):
        raise ConfigError(path.rstrip(".") or "<root>", f"must be a mapping, got {values!r}")
    hints = field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in values:
        if key not in fields:
            name = f"{path}{key}"
            raise ConfigError(name, f"unknown field (known: {', '.join(sorted(fields))})")
    current = base if base is not None else cls()
    changes: dict[str, Any] = {}
    for key, value in values.items():
        hint = hints[key]
        name = f"{path}{key}"
        if dataclasses.is_dataclass(hint):
            changes[key] = build(hint, value, getattr(current, key), f"{name}.")  # type: ignore[arg-type]
        else:
            changes[key] = _coerce(value, hint, name)
    return dataclasses.replace(current, **changes)  # type: ignore[type-var]


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON/YAML-friendly dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`train.batch_size=16` pairs to a nested mapping (values parsed as YAML scalars)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(pair, "override must look like section.field=value")
        dotted, raw = pair.split("=", 1)
        node = tree
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # "train=1" and then "train.batch_size=2"
                raise ConfigError(dotted.strip(), f"'{part}' was already given a value")
        node[parts[-1]] = userinput.parse_yaml(raw, f"--set {pair}") if raw else ""
    return tree


# --- CLI flags for one stage section -----------------------------------------------------


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per field of a flat config dataclass (values stay strings)."""
    hints = field_types(cls)
    group = parser.add_argument_group(f"{cls.__name__} (override the config file)")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint = hints[f.name]
        extra = ""
        if get_origin(hint) is Literal:
            extra = " {" + ",".join(map(str, get_args(hint))) + "}"
        default = getattr(cls(), f.name)
        group.add_argument(
            flag_name(f.name),
            dest=f"cfg_{f.name}",
            default=None,
            metavar="VALUE",
            help=f"{hint.__name__ if isinstance(hint, type) else 'choice'}{extra}; "
            f"default {default!r}",
        )


def to_flags(cfg: Any) -> list[str]:
    """The inverse of `add_flags`: a section as CLI flags (used to build stage commands)."""
    argv: list[str] = []
    for key, value in to_dict(cfg).items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        elif isinstance(value, bool):
            value = "true" if value else "false"
        argv += [flag_name(key), str(value)]
    return argv
