"""The package's layers (ARCHITECTURE.md, .importlinter): the contracts catch
a wrong-way import, and the import graph has no cycles."""
import configparser
import os
import pathlib
import re
import shutil
import subprocess
import sys

import grimp

from cm3leon_jax import gin_utils

REPO = pathlib.Path(gin_utils.REPO_ROOT)
LINT_IMPORTS = pathlib.Path(sys.executable).with_name("lint-imports")


def _copy_package(dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(REPO / "cm3leon_jax", dst / "cm3leon_jax",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / ".importlinter", dst / ".importlinter")
    return dst


def _lint(root: pathlib.Path) -> subprocess.CompletedProcess:
    # PYTHONPATH puts the copy ahead of the editable install of the repo.
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(root / ".importlinter")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_contracts_keep_the_package_and_catch_a_wrong_way_import(tmp_path):
    clean = _lint(_copy_package(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 broken" in clean.stdout

    # The models layer reaching up into a trainer: the arrow issue 27 removed.
    broken = _copy_package(tmp_path / "broken")
    vqgan = broken / "cm3leon_jax" / "models" / "vqgan.py"
    vqgan.write_text(vqgan.read_text() + "\nfrom cm3leon_jax.train import vqgan_trainer  # noqa\n")
    out = _lint(broken)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "BROKEN" in out.stdout
    assert "cm3leon_jax.models.vqgan -> cm3leon_jax.train.vqgan_trainer" in out.stdout
    # both the layers contract and the models' forbidden contract name it
    assert re.search(r"Layers, highest first .* BROKEN", out.stdout)
    assert re.search(r"Models are parameters and math.* BROKEN", out.stdout)


def _cycles(graph) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_cycle_finder_finds_a_hand_made_cycle():
    g = grimp.ImportGraph()
    for m in ("p.a", "p.b", "p.c", "p.d"):
        g.add_module(m)
    g.add_import(importer="p.a", imported="p.b")
    g.add_import(importer="p.b", imported="p.c")
    g.add_import(importer="p.c", imported="p.a")
    g.add_import(importer="p.d", imported="p.a")
    assert _cycles(g) == [["p.a", "p.b", "p.c"]]


def test_no_import_cycles_in_the_package():
    graph = grimp.build_graph("cm3leon_jax")
    assert _cycles(graph) == []


def test_every_module_is_in_a_layer():
    """A new module must be placed in .importlinter's layers, or the layers
    contract would not check it."""
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    entries = {name.strip().strip("()") for line in config["importlinter:contract:layers"]["layers"].split("\n")
               for name in re.split(r"[:|]", line) if name.strip()}
    graph = grimp.build_graph("cm3leon_jax")
    packages = {m for m in graph.modules if graph.find_children(m)}
    outside = sorted(m for m in graph.modules - packages
                     if not any(m == e or m.startswith(e + ".") for e in entries))
    assert outside == []
