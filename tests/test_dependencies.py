"""Every third-party module the package imports is a declared dependency.

A static reading of every module's imports against pyproject.toml, so it cannot drift from
the code: an import that is neither a core dependency nor guarded (inside ``try: ...
except ImportError``) would break ``pip install saffnet_fast`` without extras, as
``safetensors`` once broke ``saffnet demo``. CI also installs the built wheel alone into a
fresh environment and runs every command from there (``.ci/run``, the wheel stage).
"""
from __future__ import annotations

import ast
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "saffnet_fast"

# Distribution name -> import name, where they differ.
IMPORT_NAME = {"opencv-python-headless": "cv2", "pyyaml": "yaml"}
# Packages of the library that only load when their extra is installed: the backend
# registry imports them after checking the extra is importable.
EXTRA_ONLY_PACKAGES = {"ops/triton": "triton"}
# Optional accelerators that no extra declares: used when present, skipped otherwise.
UNDECLARED_OPTIONAL = {"faster_coco_eval"}


def _requirement_names(requirements) -> set[str]:
    names = set()
    for requirement in requirements:
        dist = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()
        names.add(IMPORT_NAME.get(dist, dist.replace("-", "_")))
    return names


def _declared() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: _requirement_names(reqs)
              for name, reqs in project.get("optional-dependencies", {}).items()}
    return _requirement_names(project["dependencies"]), extras


def _guards_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        caught = handler.type
        names = ([caught] if not isinstance(caught, ast.Tuple) else list(caught.elts)
                 if caught is not None else [])
        if caught is None or any(isinstance(n, ast.Name) and n.id in (
                "ImportError", "ModuleNotFoundError", "Exception", "BaseException")
                for n in names):
            return True
    return False


def _third_party_imports(path: pathlib.Path):
    """(module, line, guarded) for each absolute import of a non-stdlib module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    guarded_lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and _guards_import_error(node):
            for inner in node.body:
                for sub in ast.walk(inner):
                    if hasattr(sub, "lineno"):
                        guarded_lines.add(sub.lineno)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        else:
            continue
        for module in modules:
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top in ("saffnet_fast", "__future__"):
                continue
            yield top, node.lineno, node.lineno in guarded_lines


def test_every_unguarded_import_is_a_core_dependency():
    core, extras = _declared()
    optional = set().union(*extras.values()) | UNDECLARED_OPTIONAL
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        extra_only = next((extra for prefix, extra in EXTRA_ONLY_PACKAGES.items()
                           if rel.startswith(prefix + "/")), None)
        for module, line, guarded in _third_party_imports(path):
            where = f"saffnet_fast/{rel}:{line}: import {module}"
            if module in core:
                continue
            if guarded or (extra_only is not None and module in extras.get(extra_only, ())):
                if module not in optional:
                    problems.append(f"{where} is optional but no extra declares it")
                continue
            problems.append(f"{where} is neither a core dependency ({sorted(core)}) nor "
                            "guarded by `except ImportError`")
    assert not problems, "\n".join(problems)


def test_core_dependencies_cover_the_main_job():
    # What `saffnet demo` and the toolkit commands import on their default paths.
    core, _ = _declared()
    assert {"torch", "numpy", "cv2", "pycocotools", "tqdm", "yaml", "safetensors"} <= core


def test_the_checker_sees_an_unguarded_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\nimport safetensors\ntry:\n    import onnx\n"
                      "except ImportError:\n    onnx = None\n")
    assert list(_third_party_imports(module)) == [("safetensors", 2, False), ("onnx", 4, True)]
