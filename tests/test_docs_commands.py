"""Every fenced `snakemake` command in the README and docs/ runs as written: each is dry-run (`-n`) with the tiny
test config merged over its own config files.

Conventions the docs follow so that this holds: a fenced ``yaml`` block whose first line is a comment naming a file
(``# my_coco.yaml``) defines that file for the commands of the same page; paths of the user's own inputs (data,
weights) are relative, and stand-in empty files are made for inputs a dry run reports missing.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TEST_CONFIG

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^ *```(\w*)\n(.*?)^ *```", flags=re.M | re.S)
DROPPED = {"--use-conda": 0, "--directory": 1, "-d": 1, "--report": 1}  # option → number of values dropped


def fenced(page: Path) -> tuple[list[str], dict[str, str]]:
    """The snakemake command lines of ``page`` and its named YAML files (file name → text)."""
    commands, files = [], {}
    for lang, body in FENCE.findall(page.read_text()):
        if lang == "yaml":
            first = body.splitlines()[0].strip()
            if re.fullmatch(r"#\s*[\w.-]+\.ya?ml", first):
                files[first.lstrip("#").strip()] = body
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"^\s*(\./setup\.sh\s*&&\s*)?", "", line)
            if re.match(r"(\.venv/bin/)?snakemake\s", line):
                commands.append(line)
    return commands, files


CASES = [(page, cmd) for page in PAGES for cmd in fenced(page)[0]]


def dry_run_args(cmd: str, workdir: Path) -> list[str]:
    """``cmd``'s arguments for a dry run in ``workdir``: repository paths made absolute, the test config appended."""
    tokens = shlex.split(cmd, comments=True)[1:]
    args: list[str] = []
    configfiles: list[str] | None = None
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok in DROPPED:
            i += 1 + DROPPED[tok]
            continue
        if tok in ("--configfile", "--configfiles"):
            configfiles = []
            i += 1
            while i < len(tokens) and not tokens[i].startswith("-"):
                configfiles.append(tokens[i])
                i += 1
            continue
        if tok in ("--workflow-profile", "--profile") and i + 1 < len(tokens):
            args += [tok, str(REPO / tokens[i + 1]) if (REPO / tokens[i + 1]).exists() else tokens[i + 1]]
            i += 2
            continue
        args.append(tok)
        i += 1
    files = [str(REPO / f) if (REPO / f).exists() else str(workdir / f) for f in (configfiles or [])]
    if not configfiles:
        files = [str(REPO / "config" / "config.yaml")]
    return [*args, "--configfile", *files, str(TEST_CONFIG), "-n"]


@pytest.mark.parametrize(("page", "cmd"), CASES, ids=[f"{p.name}:{c[:60]}" for p, c in CASES])
def test_documented_command_dry_runs(page, cmd, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    for name, text in fenced(page)[1].items():
        (workdir / name).write_text(text)
    base = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for _ in range(4):  # stand-ins for the user's own inputs that the dry run reports missing
        proc = subprocess.run([*base, *dry_run_args(cmd, workdir)], capture_output=True, text=True, timeout=300,
                              env=env, cwd=workdir)
        out = proc.stdout + proc.stderr
        missing = re.search(r"Missing input files for rule \w+:\n(?:\s+output:.*\n)?(?:\s+wildcards:.*\n)?"
                            r"\s+affected files:\n((?:\s+\S+\n)+)", out)
        if proc.returncode == 0 or not missing:
            break
        for f in missing.group(1).split():
            if Path(f).is_absolute():
                break
            (workdir / f).parent.mkdir(parents=True, exist_ok=True)
            (workdir / f).touch()
        else:
            continue
        break
    assert proc.returncode == 0, f"{page.name}: `{cmd}` does not dry-run:\n{out[-3000:]}"
