"""`snakemake --lint` is clean (conda env on every rule, no mixed rules/functions, no hard-coded paths ...)."""

from __future__ import annotations

import re

from tests.conftest import run_snakemake


def test_snakemake_lint_is_clean(tmp_path):
    proc = run_snakemake(tmp_path, "--lint", check=False)
    out = proc.stdout + proc.stderr
    findings = re.findall(r"^Lints for (.*?):\n\s+\* (.*?):$", out, flags=re.M)
    assert not findings, "\n".join(f"{where}: {title}" for where, title in findings)
    assert proc.returncode == 0, out[-3000:]


def test_every_rule_has_a_docstring(tmp_path):
    """`snakemake --list-rules` shows each rule's docstring in parentheses: none may be missing."""
    proc = run_snakemake(tmp_path, "--list-rules")
    rules = [line for line in proc.stdout.splitlines() if re.match(r"^\w+", line) and not line.startswith("Using")]
    assert len(rules) >= 20, proc.stdout
    undocumented = [line for line in rules if not re.match(r"^\w+ \(.+\)$", line)]
    assert not undocumented, undocumented
