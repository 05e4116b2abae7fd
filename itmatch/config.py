"""Configuration: load ``config/config.yaml`` and validate it against the JSON schema.

Errors name the offending key (dotted path) and, where the schema lists them, the allowed values,
so a typo stops the run before any job starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"

DATASETS = ("coco", "f30k", "shapes")
MODELS = ("scan", "pfan", "caan", "smfea", "glfn", "bssan")


class ConfigError(ValueError):
    """The configuration does not match the schema."""


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _describe(error: jsonschema.ValidationError) -> str:
    where = _key(error.absolute_path)
    v, s = error.validator, error.schema
    if v == "additionalProperties":
        allowed = sorted(s.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        prefix = f"{where}." if error.absolute_path else ""
        return (f"config key {', '.join(prefix + e for e in extra)}: unknown; "
                f"allowed keys here: {', '.join(allowed)}")
    if v == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        prefix = f"{where}." if error.absolute_path else ""
        return f"config key {prefix}{missing}: required but missing"
    if v == "enum":
        return f"config key {where}: {error.instance!r} is not allowed; allowed values: " + ", ".join(
            map(str, error.validator_value))
    if v == "type":
        return f"config key {where}: expected {error.validator_value}, got {type(error.instance).__name__} " \
               f"({error.instance!r})"
    return f"config key {where}: {error.message}"


def validate_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """Raise :class:`ConfigError` listing every schema violation in ``config``."""
    schema = schema or load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))


def load_config(path: str | Path, overrides: list[str | Path] = ()) -> dict[str, Any]:
    """Load a config file, deep-merge override files over it, validate, return it."""
    with open(path, encoding="utf-8") as fh:
        config = yaml.safe_load(fh) or {}
    for extra in overrides:
        with open(extra, encoding="utf-8") as fh:
            deep_update(config, yaml.safe_load(fh) or {})
    validate_config(config)
    return config


def deep_update(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``other`` into ``base`` (as Snakemake does with ``--configfile``)."""
    for k, v in other.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base
