"""Digests of content (files, folders, parameters, code) used as cache keys."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

CACHE_NEUTRAL = "a change to the digests changes every key by itself"

_CHUNK = 1 << 20


def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_path(path: Path, skip: tuple[str, ...] = ("DIGEST", "STAMP")) -> str:
    """Digest of a file, or of a folder's files (relative names and contents, sorted)."""
    path = Path(path)
    if path.is_file():
        return digest_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in skip:
            continue
        h.update(rel.encode() + b"\0" + digest_file(f).encode() + b"\0")
    return h.hexdigest()


def digest_json(obj: object) -> str:
    """Digest of JSON-able parameters, independent of key order."""
    return digest_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_version(*modules: ModuleType) -> str:
    """Digest of the code the modules run: their source and, transitively, that of every
    project module they import (at the top or inside a function), ignoring comments,
    docstrings and formatting.

    A stage's cache key includes this, so editing anything a stage calls invalidates its
    artifacts (and only the artifacts of stages that call it), while editing prose does
    not. No list of modules is kept by hand: the imports are read from the code. A module
    that cannot change what any stage stores (logging, locks, input checks) says so with a
    top-level ``CACHE_NEUTRAL = "why"``; its imports are still followed.
    """
    names = sorted(set().union(*(code_closure(m.__name__) for m in modules)))
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0" + _module_digest(name).encode())
    return h.hexdigest()[:16]


def code_closure(name: str) -> frozenset[str]:
    """The project modules ``name`` imports, transitively, including ``name`` itself and the
    packages above each of them (importing a module runs its package's ``__init__``)."""
    root = _project_root(name)
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(n for n in _imports(current) if _in_project(n, root))
        todo.extend(_parents(current))
    return frozenset(seen)


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.cache
def _origin(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


@functools.cache
def _project_root(name: str) -> Path:
    """The folder holding the top-level package of ``name``: the project's root."""
    origin = _origin(name.split(".")[0])
    if origin is None:
        raise ValueError(f"{name}: no Python source to version")
    return origin.parent.parent if origin.name == "__init__.py" else origin.parent


def _in_project(name: str, root: Path) -> bool:
    origin = _origin(name)
    return origin is not None and origin.is_relative_to(root) and ".venv" not in origin.parts


@functools.cache
def _tree(name: str) -> ast.Module:
    return ast.parse(_origin(name).read_text())


@functools.cache
def _imports(name: str) -> tuple[str, ...]:
    root = _project_root(name)
    package = name if _origin(name).name == "__init__.py" else name.rpartition(".")[0]
    # never import a library to resolve its names
    return imports_in(_tree(name), package, lambda base, module: _in_project(base, root)
                      and _origin(module) is not None)


def imports_in(tree: ast.Module, package: str, is_module: Callable[[str, str], bool]) -> list[str]:
    """Every module a module's code imports, at the top or inside a function; ``from p
    import x`` counts as ``p.x`` too when ``is_module(p, "p.x")`` says x is a module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package (or one above per dot)
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.append(base)
            found += [f"{base}.{alias.name}" for alias in node.names
                      if is_module(base, f"{base}.{alias.name}")]
    return found


@functools.cache
def _module_digest(name: str) -> str:
    tree = _tree(name)
    if _is_neutral(tree):
        return "neutral"
    return digest_bytes(ast.dump(_strip_docstrings(tree)).encode())


def _is_neutral(tree: ast.Module) -> bool:
    return any(isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == "CACHE_NEUTRAL" for t in node.targets)
        for node in tree.body)
