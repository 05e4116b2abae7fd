"""Configuration: load ``config/config.yaml`` and validate it against the JSON schema.

Errors name the offending key (dotted path) and, where the schema lists them, the allowed values,
so a typo stops the run before any job starts.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

#: the JSON schema of the config: the one home of every default (the workflow links to it from workflow/schemas/)
SCHEMA_PATH = Path(__file__).resolve().parent / "config.schema.yaml"

#: the built-in datasets; any other name under config key ``datasets`` is one of your own (:func:`dataset_kind`)
DATASETS = ("coco", "f30k", "shapes")
#: dataset kinds with captions (models can be trained and evaluated on them); ``images`` has none
CAPTIONED_KINDS = ("shapes", "karpathy", "captions", "precomp")


class ConfigError(ValueError):
    """The configuration does not match the schema."""


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@functools.cache
def _shared_schema() -> dict[str, Any]:
    """The schema, read once, for read-only lookups made per job (dataset kinds and defaults)."""
    return load_schema()


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def schema_defaults(section: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults the schema gives the keys of the config section ``section`` (e.g. ``training``), without its
    per-dataset / per-model override maps: what a library caller gets for the keys it leaves out."""
    schema = schema or load_schema()
    props = _ref(schema["properties"][section], schema).get("properties", {})
    out = {}
    for key, sub in props.items():
        sub = _ref(sub, schema)
        if "default" in sub and key not in ("datasets", "models"):
            out[key] = copy.deepcopy(sub["default"])
    return out


def _ref(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with a local ``$ref`` (``#/$defs/x``) followed (once)."""
    ref = schema.get("$ref", "")
    if not ref.startswith("#/"):
        return schema
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _allowed_keys(schema: dict[str, Any], root: dict[str, Any]) -> set[str]:
    """Property names a schema (with its ``$ref`` and ``allOf`` parts) declares."""
    schema = {**_ref(schema, root), **{k: v for k, v in schema.items() if k != "$ref"}}
    keys = set(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        keys |= _allowed_keys(part, root)
    return keys


def _describe(error: jsonschema.ValidationError, root: dict[str, Any]) -> str:
    where = _key(error.absolute_path)
    v, s = error.validator, error.schema
    if "propertyNames" in error.schema_path:
        return _bad_name(where, error.instance, root)
    if v in ("additionalProperties", "unevaluatedProperties"):
        allowed = sorted(_allowed_keys(s, root))
        extra = sorted(set(error.instance) - set(allowed))
        prefix = f"{where}." if error.absolute_path else ""
        return (f"config key {', '.join(prefix + str(e) for e in extra)}: unknown; "
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


def _bad_name(where: str, name: Any, root: dict[str, Any]) -> str:
    """The message for a key of ``where`` refused by its ``propertyNames`` (only ``datasets`` has one)."""
    rule = _ref(root["properties"][where], root)["propertyNames"] if where in root["properties"] else {}
    reserved = (rule.get("not") or {}).get("enum", [])
    text = name if isinstance(name, str) else repr(name)
    if isinstance(name, str) and "/" in name:
        why = "contains '/'; a dataset name becomes one folder name (results/features/{dataset}/, ...)"
    elif name in reserved:
        why = (f"is reserved: results/{name}/ is one of the workflow's own folders; reserved names: "
               + ", ".join(reserved))
    else:
        why = ("is not a valid name: letters, digits, '_', '-' and '.' only, starting with a letter or digit "
               "(it becomes a folder name and a wildcard value)")
    return f"config key {where}.{text}: the name {text!r} {why}; choose another name"


def dataset_kind(config: dict[str, Any], name: str, schema: dict[str, Any] | None = None) -> str:
    """``datasets.<name>.kind``, or the built-in dataset's kind from the schema (shapes, karpathy)."""
    block = (config.get("datasets") or {}).get(name)
    if block is None:
        raise KeyError(f"dataset {name!r} is not configured under config key 'datasets' "
                       f"(configured: {', '.join(config.get('datasets') or {})})")
    if block.get("kind"):
        return block["kind"]
    schema = schema or _shared_schema()
    if name not in schema["properties"]["datasets"]["properties"]:
        raise ConfigError(f"config key datasets.{name}.kind: required but missing")
    return _default(schema, "datasets", name, "kind")


def has_captions(config: dict[str, Any], name: str, schema: dict[str, Any] | None = None) -> bool:
    """Whether models can be trained and evaluated on dataset ``name`` (every kind but ``images``)."""
    return dataset_kind(config, name, schema) in CAPTIONED_KINDS


def dataset_settings(config: dict[str, Any], name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The block of dataset ``name`` over the schema defaults of its kind (``$defs/<kind>_dataset``), with
    ``kind`` set: e.g. a ``captions`` dataset's ``split`` ratios when the config leaves them out."""
    schema = schema or _shared_schema()
    kind = dataset_kind(config, name, schema)
    node = schema["$defs"].get(f"{kind}_dataset", {})
    out = _nested_defaults(node, schema)
    deep_update(out, copy.deepcopy(config["datasets"][name]))
    out["kind"] = kind
    return out


def _nested_defaults(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """The defaults of an object schema's properties, and those of a property that is an object with a default
    (``split: {}`` → its seed and fractions); not of sections without one (``ingest``: the global section's)."""
    out: dict[str, Any] = {}
    for key, sub in _ref(node, root).get("properties", {}).items():
        sub = _ref(sub, root)
        if "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
            if isinstance(out[key], dict) and sub.get("properties"):
                out[key] = deep_update(_nested_defaults(sub, root), out[key])
    return out


def coerce_scalars(config: dict[str, Any], schema: dict[str, Any] | None = None) -> list[str]:
    """Turn string values the schema wants as numbers / booleans / null into them, in place.

    ``snakemake --config 'training={"lr": 3}'`` passes nested values as strings ("3"); a string is
    replaced by its YAML reading only where the schema rejects the string and accepts that reading,
    so genuine strings (paths, hex digests) are never touched. Returns the dotted keys changed.
    """
    schema = schema or load_schema()
    validator = jsonschema.Draft202012Validator(schema)
    changed: list[str] = []
    for _ in range(8):  # a fix can reveal errors deeper down (e.g. inside a branch that now applies)
        fixes = []
        for err in validator.iter_errors(config):
            if not isinstance(err.instance, str) or not err.absolute_path:
                continue
            try:
                value = yaml.safe_load(err.instance)
            except yaml.YAMLError:
                continue
            if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    continue
            if isinstance(value, (bool, int, float)) or value is None:
                if validator.evolve(schema=err.schema).is_valid(value):
                    fixes.append((list(err.absolute_path), value))
        if not fixes:
            break
        for path, value in fixes:
            node: Any = config
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
            changed.append(_key(path))
    return changed


def _default(schema: dict[str, Any], *path: str) -> Any:
    node: Any = schema
    for part in path:
        node = node["properties"][part]
    return node.get("default")


def _dataset_key_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Per-dataset maps (schema nodes marked ``x-keys: datasets``) and lists (``x-items: datasets``) name only
    datasets configured under ``datasets`` (a typo such as ``training.datasets.cooc`` is not silently ignored)."""
    names = sorted(config.get("datasets") or {})
    allowed = f"allowed keys here: {', '.join(names)} (the datasets under config key datasets)"
    errors: list[str] = []

    def walk(node: Any, sch: dict[str, Any], path: list[str]) -> None:
        sch = _ref(sch, schema)
        if sch.get("x-keys") == "datasets" and isinstance(node, dict):
            errors.extend(f"config key {_key([*path, k])}: unknown; {allowed}" for k in node if k not in names)
        if sch.get("x-items") == "datasets" and isinstance(node, list):
            errors.extend(f"config key {_key(path)}: {d!r} is not a dataset; {allowed}"
                          for d in node if d not in names)
        if isinstance(node, dict):
            extra = sch.get("additionalProperties")
            for k, v in node.items():
                sub = sch.get("properties", {}).get(k, extra if isinstance(extra, dict) else None)
                if sub is not None:
                    walk(v, sub, [*path, k])

    walk(config, schema, [])
    return errors


def _dataset_errors(config: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Checks of the datasets themselves and of settings that only some kinds support."""
    errors = []
    datasets = config.get("datasets") or {}
    for name, block in datasets.items():
        split = (block or {}).get("split") if isinstance(block, dict) else None
        if isinstance(split, dict):
            d = schema["$defs"]["captions_dataset"]["properties"]["split"]["properties"]
            val, test = split.get("val", d["val"]["default"]), split.get("test", d["test"]["default"])
            if isinstance(val, (int, float)) and isinstance(test, (int, float)) and val + test >= 1:
                errors.append(f"config key datasets.{name}.split: val {val} + test {test} leave no train images "
                              "(their sum must be below 1)")
    parsers = ((config.get("text") or {}).get("trees") or {}).get("parser") or {}
    for name, parser in parsers.items():
        if parser == "gold" and name in datasets and dataset_kind(config, name, schema) not in ("shapes", "karpathy"):
            errors.append(f"config key text.trees.parser.{name}: 'gold' reads the parses of a dataset JSON, but "
                          f"datasets.{name} is kind {dataset_kind(config, name, schema)!r} (no JSON): use stanza")
    for name in (config.get("report") or {}).get("datasets") or []:
        if name in datasets and not has_captions(config, name, schema):
            errors.append(f"config key report.datasets: {name!r} is kind 'images' (datasets.{name}.kind): it has "
                          "no captions, so no model can be trained or evaluated on it")
    return errors


def cross_field_errors(config: dict[str, Any], schema: dict[str, Any] | None = None) -> list[str]:
    """Checks between keys that a JSON schema cannot express (minimum ≤ maximum pairs, dataset names)."""
    schema = schema or load_schema()
    errors = _dataset_key_errors(config, schema) + _dataset_errors(config, schema)
    gen = ((config.get("datasets") or {}).get("shapes") or {}).get("generator")
    if isinstance(gen, dict):
        where = ("datasets", "shapes", "generator")
        lo = gen.get("min_objects", _default(schema, *where, "min_objects"))
        hi = gen.get("max_objects", _default(schema, *where, "max_objects"))
        if isinstance(lo, int) and isinstance(hi, int) and lo > hi:
            errors.append(f"config key datasets.shapes.generator.min_objects: {lo} is more than max_objects {hi}")
    det = config.get("detector") or {}
    if isinstance(det, dict):
        base = det.get("inference") if isinstance(det.get("inference"), dict) else {}
        scopes: list[tuple[str, dict[str, Any]]] = [("detector.inference", {})]
        for ds, over in (det.get("per_dataset") or {}).items():
            if isinstance(over, dict) and isinstance(over.get("inference"), dict):
                scopes.append((f"detector.per_dataset.{ds}.inference", over["inference"]))
        for scope, over in scopes:
            for lo_key, hi_key in (("min_size", "max_size"), ("min_regions", "max_regions")):
                merged = {**base, **over}
                lo, hi = merged.get(lo_key), merged.get(hi_key)
                if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))) or lo <= hi:
                    continue
                if over and lo_key not in over and hi_key not in over:
                    continue  # reported once, for detector.inference
                lo_at = f"{scope}.{lo_key}" if lo_key in over else f"detector.inference.{lo_key}"
                hi_at = f"{scope}.{hi_key}" if hi_key in over else f"detector.inference.{hi_key}"
                errors.append(f"config key {lo_at}: {lo} is more than {hi_at} {hi}")
    return errors


def validate_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> None:
    """Raise :class:`ConfigError` listing every schema violation and cross-field error in ``config``.

    Numbers, booleans and nulls that arrived as strings (nested ``--config`` values) are converted
    first, in place (:func:`coerce_scalars`).
    """
    schema = schema or load_schema()
    coerce_scalars(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    messages = [_describe(e, schema) for e in errors]
    if not errors:
        messages = cross_field_errors(config, schema)
    if messages:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(dict.fromkeys(messages)))


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
