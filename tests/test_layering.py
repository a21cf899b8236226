"""Who may use what: production code does not import the tests' oracle (reference.py) except where the "torch"
debug backend runs it by definition, and nothing outside cache.py touches KVCache's private state."""
from __future__ import annotations

import ast
from pathlib import Path

import torch

import coconut_kernels
from coconut_kernels import reference
from coconut_kernels.cache import KVCache
from coconut_kernels.ops.latent_attention import unrotate

PACKAGE = Path(coconut_kernels.__file__).parent

# (module, function) pairs that run the oracle as the "torch" backend (backend.py), importing it lazily
TORCH_BACKEND = {("ops/latent_attention.py", "kernels"), ("ops/latent_feedback.py", "latent_feedback_"),
                 ("ops/latent_feedback.py", "latent_feedback"), ("ops/soft_embedding.py", "soft_embedding")}


def production_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel != "reference.py" and not rel.startswith("bench/"):  # the benchmarks may run the oracle
            yield rel, ast.parse(path.read_text(), filename=str(path))


def imports_reference(node: ast.AST, module: str) -> bool:
    depth = module.count("/") + 1  # relative level that reaches the package root
    if isinstance(node, ast.Import):
        return any(a.name == "coconut_kernels.reference" for a in node.names)
    if isinstance(node, ast.ImportFrom):
        target = node.module or ""
        if node.level == 0:
            return target == "coconut_kernels.reference" or (target == "coconut_kernels" and any(
                a.name == "reference" for a in node.names))
        if node.level == depth:
            return target == "reference" or (target == "" and any(a.name == "reference" for a in node.names))
    return False


def reference_imports(module: str, tree: ast.Module):
    """(enclosing function or None, line) of every import of reference.py in a module."""
    found = []

    def visit(node, func):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if imports_reference(child, module):
                found.append((func, child.lineno))
            visit(child, inner)

    visit(tree, None)
    return found


def test_the_finder_sees_imports_of_reference():
    tree = ast.parse("from .. import reference\ndef f():\n    from ..reference import x\n")
    assert reference_imports("ops/x.py", tree) == [(None, 1), ("f", 3)]
    assert reference_imports("x.py", ast.parse("from .reference import y\nimport coconut_kernels.reference")) == \
        [(None, 1), (None, 2)]


def test_production_code_does_not_import_the_oracle():
    bad = []
    for module, tree in production_modules():
        for func, line in reference_imports(module, tree):
            if (module, func) not in TORCH_BACKEND:
                bad.append(f"{module}:{line} ({func or 'module level'})")
    assert not bad, f"production modules import reference.py (the tests' oracle): {bad}"


def kvcache_private_names() -> set[str]:
    cache = KVCache(1, 1, 2, 1, 2)
    names = {n for n in vars(cache) if n.startswith("_")}
    names |= {n for n in vars(KVCache) if n.startswith("_") and not n.startswith("__")}
    assert {"_train", "_chain", "_pass_lengths"} <= names
    return names


def test_nothing_outside_the_cache_touches_its_private_state():
    private = kvcache_private_names()
    bad = []
    for module, tree in production_modules():
        if module == "cache.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in private:
                bad.append(f"{module}:{node.lineno} .{node.attr}")
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("cache"):
                bad += [f"{module}:{node.lineno} imports {a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, f"KVCache's private state used outside cache.py: {bad}"


def test_unrotate_inverts_the_reference_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 10, dtype=torch.float64)
    ang = torch.rand(16, 4, dtype=torch.float64) * 6
    pos = torch.randint(0, 16, (2, 3))
    for interleaved in (False, True):
        rotated = reference.apply_rotary_reference(x, ang.cos(), ang.sin(), pos, interleaved)
        torch.testing.assert_close(unrotate(rotated, ang.cos(), ang.sin(), pos, interleaved), x)
        expected = reference.apply_rotary_reference(x, ang.cos(), ang.sin(), pos, interleaved, inverse=True)
        torch.testing.assert_close(unrotate(x, ang.cos(), ang.sin(), pos, interleaved), expected)


APPLICATIONS = ("interop", "training", "train", "engine", "serve", "analysis", "bench", "benchmarks")


def imported_packages(module: str, tree: ast.Module):
    """The top-level coconut_kernels packages/modules `module` imports (relative or absolute), with line numbers."""
    depth = module.count("/") + 1
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == depth and node.module:
                yield node.module.split(".")[0], node.lineno
            elif node.level == depth:
                yield from ((a.name, node.lineno) for a in node.names)
            elif node.level == 0 and (node.module or "").startswith("coconut_kernels."):
                yield node.module.split(".")[1], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("coconut_kernels."):
                    yield a.name.split(".")[1], node.lineno


def test_the_layers_below_the_applications_do_not_import_them():
    top = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()}
    assert set(APPLICATIONS) & top >= {"interop", "training", "train"}
    bad = []
    for module, tree in production_modules():
        if module.split("/")[0].removesuffix(".py") in APPLICATIONS or module == "__init__.py":
            continue
        bad += [f"{module}:{line} imports {name}" for name, line in imported_packages(module, tree)
                if name in APPLICATIONS]
    assert not bad, f"a lower layer imports an application: {bad}"


def test_the_import_finder_sees_an_application_import():
    tree = ast.parse("from ..interop import official\ndef f():\n    from ..training.build import x\n")
    assert [n for n, _ in imported_packages("models/loading.py", tree)] == ["interop", "training"]
