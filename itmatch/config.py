"""Configuration: load ``config/config.yaml`` and validate it against the JSON schema.

Errors name the offending key (dotted path) and, where the schema lists them, the allowed values,
so a typo stops the run before any job starts.
"""

from __future__ import annotations

import copy
import functools
import re
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

#: what a run folder results/{model}/{dataset}/ holds besides variant folders: a variant may not be named so
#: (the schema's ``$defs/variant_name`` refuses the folders by name and the files by their dot)
RUN_FOLDER_ENTRIES = ("model.pt", "train_log.csv", "metrics.json", "sims.h5", "ranks.parquet", ".train_state.pt",
                      "t2i", "i2t", "tensorboard")


class ConfigError(ValueError):
    """The configuration does not match the schema."""


#: PyYAML's safe loader, its C (libyaml) build where PyYAML has it: the schema takes 0.8 s to read in pure Python,
#: and every ``snakemake`` command reads it
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: str | Path) -> Any:
    """A YAML file's content (safe loader)."""
    with open(path, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=SAFE_LOADER)


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    return load_yaml(path)


@functools.cache
def _shared_schema() -> dict[str, Any]:
    """The schema, read once, for read-only lookups made per job (dataset kinds and defaults)."""
    return load_schema()


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def schema_defaults(section: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """The defaults the schema gives the keys of the config section ``section``, without its per-dataset /
    per-model override maps (``datasets`` / ``models`` objects): what a library caller gets for the keys it
    leaves out.

    ``section`` is a dotted path of keys (``training``, ``detector.training``, ``models.glfn``), or
    ``$defs.<name>`` for a shared definition (``$defs.download``)."""
    if schema is None:
        return copy.deepcopy(_cached_defaults(section))
    parts = section.split(".")
    node = schema["$defs"][parts[1]] if parts[0] == "$defs" else schema
    for part in parts[2:] if parts[0] == "$defs" else parts:
        props = _properties(node, schema)
        if part not in props:
            raise KeyError(f"schema_defaults({section!r}): the schema has no key {part!r} there")
        node = {"allOf": props[part]}
    out = {}
    for key, subs in _properties(node, schema).items():
        defaults = [p["default"] for sub in subs for p in _parts(sub, schema) if "default" in p]
        if defaults and not (key in ("datasets", "models") and isinstance(defaults[0], dict)):
            out[key] = copy.deepcopy(defaults[0])
    return out


@functools.cache
def _cached_defaults(section: str) -> dict[str, Any]:
    return schema_defaults(section, load_schema())


def _parts(schema: dict[str, Any], root: dict[str, Any]) -> list[dict[str, Any]]:
    """``schema`` and, recursively, what its local ``$ref`` and its ``allOf`` parts point to."""
    parts = [schema]
    if str(schema.get("$ref", "")).startswith("#/"):
        parts += _parts(_ref(schema, root), root)
    for part in schema.get("allOf", []):
        parts += _parts(part, root)
    return parts


def _properties(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every key a schema declares (itself, its ``$ref`` and ``allOf`` parts) → the subschemas given for it, the
    schema's own first (a key's type may come from a shared definition, its default from the section using it)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for part in _parts(schema, root):
        for key, sub in part.get("properties", {}).items():
            out.setdefault(key, []).append(sub)
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
    return set(_properties(schema, root))


def variant_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a variant (its folder results/{model}/{dataset}/{name}/), or None."""
    if "/" in name:
        return "contains '/' (a variant is one folder under results/{model}/{dataset}/)"
    if name in RUN_FOLDER_ENTRIES:
        return (f"collides with a run folder's own {'file' if '.' in name else 'folder'} (a run folder holds "
                f"{', '.join(RUN_FOLDER_ENTRIES)})")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        return "use letters, digits, '_' and '-', starting with a letter or digit"
    return None


def _describe(error: jsonschema.ValidationError, root: dict[str, Any]) -> str:
    where = _key(error.absolute_path)
    v, s = error.validator, error.schema
    if "propertyNames" in error.schema_path:  # a key that may not be used as a name (a dataset's, a variant's)
        if error.absolute_path and error.absolute_path[0] == "variants":
            name = str(error.instance)
            return f"config key {where}.{name}: not a valid variant name: {variant_name_error(name) or error.message}"
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
        parts = _parts(sch, schema)  # the node, what its $ref and allOf parts point to
        if any(p.get("x-keys") == "datasets" for p in parts) and isinstance(node, dict):
            errors.extend(f"config key {_key([*path, k])}: unknown; {allowed}" for k in node if k not in names)
        if any(p.get("x-items") == "datasets" for p in parts) and isinstance(node, list):
            errors.extend(f"config key {_key(path)}: {d!r} is not a dataset; {allowed}"
                          for d in node if d not in names)
        if isinstance(node, dict):
            props = _properties(sch, schema)
            extra = next((p["additionalProperties"] for p in parts if isinstance(p.get("additionalProperties"), dict)),
                         None)
            for k, v in node.items():
                for sub in props.get(k) or ([extra] if extra is not None else []):
                    walk(v, sub, [*path, k])

    walk(config, schema, [])
    return list(dict.fromkeys(errors))  # (a key reached through several schema parts is reported once)


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
    errors += variant_errors(config, schema)
    return errors


#: settings of models.scan / models.pfan (one schema) that only PFAN reads
PFAN_ONLY_KEYS = ("block_dim", "position_norm", "position")


def variant_errors(config: dict[str, Any], schema: dict[str, Any] | None = None) -> list[str]:
    """Variants (``variants.<model>.<name>``) the workflow could not run: one that switches between one model and
    a fusion of separately trained directions (``fuse`` empty vs. not: the rules differ), PFAN-only settings on
    SCAN (SCAN ignores them)."""
    schema = schema or load_schema()
    errors = []
    models = config.get("models") or {}
    for model, variants in (config.get("variants") or {}).items():
        for name, spec in (variants or {}).items():
            over = (spec or {}).get("model") or {}
            where = f"config key variants.{model}.{name}.model"
            if "fuse" in over:
                block = _ref(schema["properties"]["models"]["properties"][model], schema)
                default = block.get("properties", {}).get("fuse", {}).get("default")
                base = (models.get(model) or {}).get("fuse", default)
                if bool(over["fuse"]) != bool(base):
                    errors.append(f"{where}.fuse: {over['fuse']!r} switches between one model and fused directions "
                                  f"(models.{model}.fuse is {base!r}); a variant keeps the model's kind")
            if model == "scan":
                errors += [f"{where}.{k}: PFAN only (SCAN does not read it)" for k in PFAN_ONLY_KEYS if k in over]
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
    config = load_yaml(path) or {}
    for extra in overrides:
        deep_update(config, load_yaml(extra) or {})
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
