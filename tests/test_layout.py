"""The house: the runtime package holds what runs in the webui and never imports the tools; only the webui glue
imports the webui; every strategy has exactly one rule."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from .conftest import ROOT

RUNTIME = os.path.join(ROOT, "lib_memslice")


def _modules(folder):
    for here, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith(".py"):
                yield os.path.join(here, name)


def _imports(path):
    """(module imported, inside a function?) for every import statement of a file."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((alias.name, nested) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, nested))
            visit(child, nested)

    visit(tree, False)
    return found


def test_the_runtime_never_imports_the_tools():
    """Only the CLI's ``bench`` command reaches them, lazily, inside the function that runs it."""
    for path in _modules(RUNTIME):
        for module, in_function in _imports(path):
            if module.split(".")[0] == "memslice_tools":
                assert path.endswith(os.path.join("lib_memslice", "cli.py")) and in_function, (path, module)


def test_only_the_webui_glue_imports_the_webui():
    glue = os.path.join(RUNTIME, "webui")
    for path in _modules(RUNTIME):
        for module, _ in _imports(path):
            if module.split(".")[0] == "modules":
                assert path.startswith(glue), (path, module)


def test_planning_a_job_loads_nothing_of_the_tools():
    code = (
        "import sys, lib_memslice.cli as cli, lib_memslice.api, lib_memslice.forwards\n"
        "assert cli.main(['plan', '--memory', '8GiB', '--device', 'cuda', '--json']) == 0\n"
        "assert not [m for m in sys.modules if m.startswith('memslice_tools')], 'tools imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_one_list_of_strategies():
    """The rules' table is the list: the settings, the CLI and the routes read it (no second copy)."""
    import argparse

    from lib_memslice import cli, settings, strategies

    assert tuple(strategies.RULES) == strategies.NAMES and not hasattr(settings, "STRATEGIES")
    plan = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["plan"]
    assert next(a for a in plan._actions if a.dest == "strategy").choices == strategies.NAMES
