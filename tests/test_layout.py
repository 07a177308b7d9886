"""The import graph flows one way: scripts -> library, no circle, the model apart from training."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imports() -> dict:
  """{module: the jaxformer modules it imports}, read from the source (nothing is executed)."""
  paths = glob.glob(os.path.join(ROOT, "jaxformer", "**", "*.py"), recursive=True)
  modules, graph = {_module(p) for p in paths}, {}
  for path in paths:
    name, found = _module(path), set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxformer"):
        # `from a.b import c` imports the module a.b.c where there is one, else a name of a.b.
        for a in node.names:
          found.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module)
      elif isinstance(node, ast.Import):
        found.update(a.name for a in node.names if a.name.startswith("jaxformer"))
    graph[name] = found
  # The top-level package is empty: `from jaxformer import x` imports x, not it.
  return {m: {d for d in deps if d in graph and d not in (m, "jaxformer")} for m, deps in graph.items()}


def reachable(graph: dict, start: str) -> set:
  seen, todo = set(), [start]
  while todo:
    for dep in graph[todo.pop()]:
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def test_no_import_circle():
  graph = imports()
  circles = [m for m in graph if m in reachable(graph, m)]
  assert not circles, circles


def test_the_model_imports_only_its_kernels():
  deps = reachable(imports(), "jaxformer.model")
  assert deps <= {"jaxformer.kernels", "jaxformer.kernels.attention", "jaxformer.kernels.layers",
                  "jaxformer.kernels.matmul"}, deps


def test_run_folder_readers_do_not_reach_training_or_each_other():
  graph = imports()
  assert not {"jaxformer.train", "jaxformer.data", "jaxformer.sweep", "jaxformer.plots",
              "jaxformer.results"} & reachable(graph, "jaxformer.runs")
  assert "jaxformer.sweep" not in reachable(graph, "jaxformer.plots") | reachable(graph, "jaxformer.evaluate")
  assert "jaxformer.allocator" not in set().union(*(reachable(graph, m) for m in graph if m != "jaxformer.allocator"))


def test_scripts_do_not_touch_sys_path():
  for path in glob.glob(os.path.join(ROOT, "scripts", "*.py")):
    assert "sys.path" not in open(path).read(), path
