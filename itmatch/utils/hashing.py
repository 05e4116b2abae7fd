"""Hashes used for provenance (weights in HDF5 attributes) and for code versions (rule ``code`` params)."""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _module_file(root: Path, name: str) -> Path | None:
    """The source file of ``itmatch`` module ``name`` (a package's ``__init__.py``), or None if it is not one."""
    parts = name.split(".")
    if parts[0] != "itmatch":
        return None
    base = root.joinpath(*parts[1:])
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imported_modules(tree: ast.AST, package: str) -> set[str]:
    """Every module an ``import`` / ``from … import`` anywhere in ``tree`` may load (``from p import x`` adds
    both ``p`` and ``p.x``: ``x`` may be a submodule). ``package`` resolves relative imports."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    # importing a.b.c runs a/__init__ and a/b/__init__ too
    return {".".join(n.split(".")[:i]) for n in names for i in range(1, n.count(".") + 2)}


def _code_text(source: str) -> str:
    """The code of a module without comments and docstrings (an AST dump), so editing prose reruns nothing."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


@cache
def _file_imports(path: Path, package: str, stamp: tuple[int, int]) -> frozenset[str]:
    """:func:`_imported_modules` of a file, parsed once per process per file version (``stamp``: mtime, size):
    the Snakefile asks for the closures of ~20 scripts that share most of their modules."""
    return frozenset(_imported_modules(ast.parse(path.read_text()), package))


@cache
def _file_code(path: Path, stamp: tuple[int, int]) -> str:
    """:func:`_code_text` of a file, once per process per file version."""
    return _code_text(path.read_text())


def import_closure(*entries: str | Path) -> list[Path]:
    """The ``itmatch`` source files that ``entries`` (module names or script paths) import, transitively.

    Static: imports found anywhere in a file count (also those inside functions); modules loaded by name
    at run time (the model registry's ``importlib``) do not, so a caller adds them as entries.
    """
    root = Path(__file__).resolve().parent.parent
    todo: list[tuple[Path, str]] = []
    for e in entries:
        f = Path(e) if str(e).endswith(".py") else _module_file(root, str(e))
        if f is None or not f.is_file():
            raise FileNotFoundError(f"code version: no itmatch module or script {e!r}")
        todo.append((f.resolve(), str(e) if not str(e).endswith(".py") else ""))
    seen: dict[Path, None] = {}
    while todo:
        f, name = todo.pop()
        if f in seen:
            continue
        seen[f] = None
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for mod in _file_imports(f, package, _stamp(f)):
            g = _module_file(root, mod)
            if g is not None and g.resolve() not in seen:
                todo.append((g.resolve(), mod))
    return sorted(seen)


def code_hash(*entries: str | Path) -> str:
    """Hash of the code (not comments or docstrings) of ``entries`` and every ``itmatch`` module they import.

    A rule's ``params: code=`` value, derived from the script it runs: editing any module on the script's
    import graph reruns the rule (Snakemake's ``code`` trigger sees only the script itself).
    """
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in import_closure(*entries):
        h.update((f.relative_to(root) if f.is_relative_to(root) else Path(f.name)).as_posix().encode())
        h.update(_file_code(f, _stamp(f)).encode())
    return h.hexdigest()[:16]
