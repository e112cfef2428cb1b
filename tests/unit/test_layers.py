"""The engine, parallel/, imports torch, pydantic, PyYAML, numpy and the standard library only.

Every import statement is read from the source (top level and inside functions), so a lazy
import counts too. That the layers import one way only (api -> service -> workers -> parallel)
is import-linter's contract in pyproject.toml, run by `make lint`.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE_ALLOWED = {"torch", "pydantic", "yaml", "numpy", "parallel"}
# Named by issue #4: checkpoint storage "through fsspec" (itself a dependency of torch) and the
# Hugging Face export in safetensors. Both only move bytes to and from files; no Ray, web or database.
ENGINE_EXCEPTIONS = {"parallel/ckpt_storage.py": {"fsspec"}, "parallel/hf.py": {"safetensors"}}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", _files("parallel"), ids=lambda p: str(p.relative_to(ROOT)))
def test_engine_imports_torch_and_the_standard_library_only(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    allowed = ENGINE_ALLOWED | set(sys.stdlib_module_names) | ENGINE_EXCEPTIONS.get(rel, set())
    assert _imports(path) <= allowed, f"{rel} imports {sorted(_imports(path) - allowed)}"


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    """Guards the test above: an import inside a function body is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from service.store import Store\n    import ray\n")
    assert _imports(bad) == {"service", "ray"}
