"""`make schema`: the parts of the Helm chart that mirror the Python code, generated from it.

values.schema.json: the `pipeline` definitions from skinlesion/config.py (types, defaults,
choices, ranges and descriptions from the field metadata), the keys of `stages` and the
stage pools from skinlesion/stages.py STAGES; the rest of the file is written by hand.
templates/_stages.tpl: the stages in run order and the jobs/ entrypoint of each.
tests/test_chart.py fails when a committed file differs from what this generates.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, get_args, get_origin

from skinlesion import config, fields
from skinlesion.stages import STAGES, Pool
from tests.chart_render import CHART, ROOT

SCHEMA = CHART / "values.schema.json"
STAGES_TEMPLATE = CHART / "templates" / "_stages.tpl"
_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string"}
_PREFIX = "pipeline"  # definitions of the config sections: pipelinePrepareConfig, ...


def _field_schema(f: dataclasses.Field[Any], hint: Any, default: Any) -> dict[str, Any]:
    choices = fields.field_choices(f, hint)
    if get_origin(hint) is tuple:
        item: dict[str, Any] = {"type": _JSON_TYPES[get_args(hint)[0]]}
        if choices is not None:
            item["enum"] = list(choices)
        node: dict[str, Any] = {"type": "array", "items": item}
    elif choices is not None:
        node = {"type": "string", "enum": list(choices)}
    else:
        node = {"type": _JSON_TYPES[hint]}
    span = fields.field_range(f)
    node["default"] = default
    node["description"] = fields.field_doc(f) + (f"; must be {span}" if span else "")
    return node


def _object(cls: type, definitions: dict[str, Any]) -> dict[str, Any]:
    """The schema of a config dataclass; nested sections go into `definitions`."""
    hints = fields.field_types(cls)
    defaults = fields.to_dict(cls())
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            name = _PREFIX + hint.__name__
            definitions[name] = _object(hint, definitions)  # type: ignore[arg-type]
            properties[f.name] = {"$ref": f"#/definitions/{name}"}
        else:
            properties[f.name] = _field_schema(f, hint, defaults[f.name])
    return {"type": "object", "additionalProperties": False, "properties": properties}


def pipeline_definitions() -> dict[str, Any]:
    """`definitions` entries for the `pipeline` values: the config plus the preset."""
    definitions: dict[str, Any] = {}
    pipeline = _object(config.PipelineConfig, definitions)
    preset = {
        "type": "string",
        "enum": list(config.PRESETS),
        "description": "named preset (skinlesion/config.py PRESETS) the fields apply over",
    }
    pipeline["properties"] = {"preset": preset, **pipeline["properties"]}
    pipeline["required"] = ["preset"]
    pipeline["description"] = (
        "skinlesion/config.py PipelineConfig, field names as there, plus the preset; "
        "defaults are those of the preset 'default' (other presets change some); the ranges "
        "are checked by the Python config when the controller loads it"
    )
    return {**definitions, _PREFIX: pipeline}


def schema(current: dict[str, Any]) -> dict[str, Any]:
    """`current` (the committed schema) with its generated parts made anew."""
    out = json.loads(json.dumps(current))
    names = [s.name for s in STAGES]
    stages = out["properties"]["stages"]
    stages["required"] = names
    stages["properties"] = {n: {"$ref": "#/definitions/stage"} for n in names}
    out["properties"]["pipeline"] = {"$ref": f"#/definitions/{_PREFIX}"}
    definitions = out["definitions"]
    definitions["stage"]["properties"]["pool"]["enum"] = list(get_args(Pool))
    kept = {k: v for k, v in definitions.items() if not k.startswith(_PREFIX)}
    out["definitions"] = {**kept, **pipeline_definitions()}
    return out  # type: ignore[no-any-return]


def stages_template() -> str:
    names = " ".join(s.name for s in STAGES)
    jobs = "".join(f"{s.name}: {s.job}\n" for s in STAGES)
    return (
        "{{- /* Generated from skinlesion/stages.py STAGES by `make schema`: do not edit. */}}\n"
        "\n"
        "{{/* The stages in run order, separated by spaces. */}}\n"
        '{{- define "skinlesion.stageNames" -}}\n'
        f"{names}\n"
        "{{- end }}\n"
        "\n"
        "{{/* The jobs/ entrypoint of each stage. */}}\n"
        '{{- define "skinlesion.stageEntrypoints" -}}\n'
        f"{jobs}"
        "{{- end }}\n"
    )


def generated() -> dict[Path, str]:
    """Each generated file and the text it must hold."""
    current = json.loads(SCHEMA.read_text())
    return {
        SCHEMA: json.dumps(schema(current), indent=2) + "\n",
        STAGES_TEMPLATE: stages_template(),
    }


def main() -> None:
    for path, text in generated().items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
