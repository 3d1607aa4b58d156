"""Digests of content (files, folders, parameters, code) used as cache keys."""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
from pathlib import Path
from types import ModuleType

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
    """Digest of the modules' code, ignoring comments, docstrings and formatting.

    A stage's cache key includes this, so changing what a stage computes invalidates its
    artifacts, while editing prose does not.
    """
    h = hashlib.sha256()
    for module in modules:
        tree = _strip_docstrings(ast.parse(inspect.getsource(module)))
        h.update(ast.dump(tree).encode())
    return h.hexdigest()[:16]
