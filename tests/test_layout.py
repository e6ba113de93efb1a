"""The package layout the README's architecture section describes: no import cycles, no module
importing another module's private names, a cheap public API, lazily registered detectors."""

import ast
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "grood_jax"


def _modules() -> dict[str, pathlib.Path]:
  mods = {}
  for f in PKG.rglob("*.py"):
    rel = f.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    mods[".".join(parts)] = f
  return mods


def _resolve(mods, cur: str, node: ast.ImportFrom) -> str:
  if not node.level:
    return node.module or ""
  parts = cur.split(".")
  if mods[cur].name != "__init__.py":
    parts = parts[:-1]
  parts = parts[:len(parts) - (node.level - 1)]
  return ".".join(parts + ([node.module] if node.module else []))


def import_graph():
  """(module-level edges {module: {imported modules}}, private-name imports [str])."""
  mods = _modules()
  edges = {m: set() for m in mods}
  private = []
  for m, f in mods.items():
    tree = ast.parse(f.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for a in node.names:
          if a.name in mods and id(node) in top:
            edges[m].add(a.name)
      elif isinstance(node, ast.ImportFrom):
        base = _resolve(mods, m, node)
        if not base.startswith("grood_jax"):
          continue
        for a in node.names:
          sub = f"{base}.{a.name}"
          target = sub if sub in mods else base
          if id(node) in top and target in mods:
            edges[m].add(target)
          if (a.name.startswith("_") and not a.name.startswith("__") and sub not in mods
              and base != m):
            private.append(f"{m} imports {base}.{a.name}")
          if any(p.startswith("_") and not p.startswith("__") for p in target.split(".")) \
              and not m.startswith(target.rsplit(".", 1)[0]):
            private.append(f"{m} imports the private module {target}")
      elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        pass
  return edges, private


def _cycles(edges) -> list[list[str]]:
  color, stack, found = {}, [], []

  def visit(m):
    color[m] = 1
    stack.append(m)
    for n in sorted(edges[m]):
      if color.get(n) == 1:
        found.append(stack[stack.index(n):] + [n])
      elif n not in color:
        visit(n)
    stack.pop()
    color[m] = 2

  for m in sorted(edges):
    if m not in color:
      visit(m)
  return found


def test_no_import_cycles_and_no_private_imports():
  edges, private = import_graph()
  assert not _cycles(edges), _cycles(edges)
  assert not private, private


def test_the_checker_finds_a_cycle_and_a_private_import():
  edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
  assert _cycles(edges) == [["a", "b", "c", "a"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def _loaded_after(code: str) -> set[str]:
  out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
                       capture_output=True, text=True, check=True, cwd=PKG.parent)
  return set(out.stdout.split())


def test_import_grood_jax_is_cheap_and_the_maths_pulls_no_data_or_detectors():
  assert not {m for m in _loaded_after("import grood_jax") if m.startswith(("jax", "flax"))}
  loaded = _loaded_after("import grood_jax.grood, grood_jax.lowdim, grood_jax.ops, "
                         "grood_jax.parallel, grood_jax.metrics")
  heavy = {"PIL", "grain", "tensorflow_datasets", "matplotlib", "orbax", "sklearn"}
  assert not heavy & {m.split(".")[0] for m in loaded}
  assert not {m for m in loaded if m.startswith(("grood_jax.data", "grood_jax.detectors",
                                                 "grood_jax.scoring", "grood_jax.report",
                                                 "grood_jax.training"))}


def test_detectors_are_imported_on_first_use_only():
  loaded = _loaded_after("import grood_jax.detectors as d; d.make_detector('knn')")
  assert "grood_jax.detectors.knn" in loaded
  assert not {"grood_jax.detectors.grood", "grood_jax.detectors.lowdim",
              "grood_jax.detectors.odin"} & loaded


def test_every_public_name_resolves_and_has_a_docstring():
  import grood_jax as gj
  for name in gj.__all__:
    obj = getattr(gj, name)
    if name == "__version__":
      continue
    assert (getattr(obj, "__doc__", None) or "").strip(), f"grood_jax.{name} has no docstring"


@pytest.mark.parametrize("module", ["grood_jax.ops.numerics", "grood_jax.ops.knn",
                                    "grood_jax.parallel", "grood_jax.grood.loss",
                                    "grood_jax.detectors.registry"])
def test_public_functions_have_docstrings(module):
  import importlib
  import inspect
  mod = importlib.import_module(module)
  missing = [n for n, f in vars(mod).items()
             if not n.startswith("_") and inspect.isfunction(f) and f.__module__ == module
             and not (f.__doc__ or "").strip()]
  assert not missing, f"{module}: no docstring on {missing}"
