"""The package's import graph, read from the source: no cycle, no upward import.

Layers, bottom up: the library (data, layers, ops, decoding, checkpoints, ...),
the model zoo (`t5x_lite.models`), the task registry (`t5x_lite.tasks`, the
repo's tasks/ folder installed under that name) and the entry points, which may
import anything. Every import statement counts, those inside functions too,
except under `if __name__ == '__main__':` (a module run as a script is
`__main__`, not itself). `python tests/test_import_graph.py` prints the figures.
"""

import ast
import os
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 't5x_lite'
REGISTRY = 't5x_lite.tasks'
ZOO = 't5x_lite.models'
ENTRY_POINTS = frozenset(f'{PACKAGE}.{name}' for name in (
    'train', 'eval', 'infer', 'benchmark', 'precompile', 'precompute_reference',
    'self_instruct', 'orca', 'evol_instruct', 'back_translate', 'import_hf', 'export_hf',
    'layout_bench', 'decode_bench', 'show_task'))
# Modules below the model zoo: they work on arrays and param trees, never on a model.
BELOW_ZOO = tuple(f'{PACKAGE}.{name}' for name in (
    'checkpoints', 'decoding', 'data', 'layers', 'ops'))


def under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + '.')


def find_modules(directory: str, package: str) -> dict:
  """{dotted module name: path} of the .py files under `directory`, which is
  imported as `package`."""
  found = {}
  for folder, _, files in os.walk(directory):
    for file in files:
      if not file.endswith('.py'):
        continue
      parts = os.path.relpath(os.path.join(folder, file[:-3]), directory).split(os.sep)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      found['.'.join([package] + parts)] = os.path.join(folder, file)
  return found


def _is_main_guard(node: ast.AST) -> bool:
  test = getattr(node, 'test', None)
  return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
          and isinstance(test.left, ast.Name) and test.left.id == '__name__'
          and any(isinstance(c, ast.Constant) and c.value == '__main__'
                  for c in test.comparators))


def _nodes(tree: ast.Module):
  """Every node of the module except the bodies of its `__main__` sections."""
  for stmt in tree.body:
    if _is_main_guard(stmt):
      for other in stmt.orelse:
        yield from ast.walk(other)
    else:
      yield from ast.walk(stmt)


def _imported(tree: ast.Module, module: str, is_package: bool):
  """Dotted names a module imports (not yet matched against known modules)."""
  for node in _nodes(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = module.split('.') if is_package else module.split('.')[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = '.'.join(base + ([node.module] if node.module else []))
      else:
        source = node.module
      yield source
      yield from (f'{source}.{alias.name}' for alias in node.names if alias.name != '*')
    elif (isinstance(node, ast.Call) and node.args
          and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
          and getattr(node.func, 'attr', getattr(node.func, 'id', None))
          in ('import_module', '__import__')):
      yield node.args[0].value


def build_graph(modules: dict) -> dict:
  """{module: set of modules it imports}. Importing `a.b.c` also imports the
  packages `a` and `a.b`; a module's own enclosing packages are left out (they
  are always loaded before it)."""
  graph = {m: set() for m in modules}
  for module, path in modules.items():
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read(), path)
    for name in _imported(tree, module, path.endswith('__init__.py')):
      while name and name not in modules:  # `from m import function`: m
        name = name.rpartition('.')[0]
      while name:
        if name != module and not under(module, name):
          graph[module].add(name)
        name = name.rpartition('.')[0]
        if name not in modules:
          break
  return graph


def cycles(graph: dict) -> list:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
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

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(found)


def forbidden_edges(graph: dict, rules) -> list:
  """'src -> dst' for each edge that a rule (is_source(src), dst_prefix) forbids."""
  return sorted(f'{src} -> {dst}' for src, dsts in graph.items() for dst in dsts
                for is_source, prefix in rules if is_source(src) and under(dst, prefix))


def is_library(module: str) -> bool:
  return (under(module, PACKAGE) and not under(module, REGISTRY)
          and module not in ENTRY_POINTS)


RULES = (
    (is_library, REGISTRY),  # below the entry points, nothing imports the registry
    (lambda m: any(under(m, p) for p in BELOW_ZOO), ZOO),
)


def package_graph(repo: str = REPO) -> dict:
  modules = find_modules(os.path.join(repo, PACKAGE), PACKAGE)
  modules.update(find_modules(os.path.join(repo, 'tasks'), REGISTRY))
  return build_graph(modules)


def summary(graph: dict, rules=RULES) -> dict:
  return {'modules': len(graph), 'edges': sum(map(len, graph.values())),
          'cycles': cycles(graph), 'upward imports': forbidden_edges(graph, rules)}


def _figures(s: dict) -> str:
  return (f"{s['modules']} modules, {s['edges']} import edges, {len(s['cycles'])} cycles, "
          f"{len(s['upward imports'])} upward imports")


def test_package_has_no_cycle_and_no_upward_import():
  graph = package_graph()
  s = summary(graph)
  print(_figures(s))
  assert s['modules'] > 50 and s['edges'] > 200, _figures(s)  # the walk saw the package
  assert REGISTRY in graph and f'{ZOO}.common' in graph and f'{PACKAGE}.decoding' in graph
  assert not s['cycles'], 'import cycles:\n' + '\n'.join(' <-> '.join(c) for c in s['cycles'])
  assert not s['upward imports'], (
      'upward imports (library modules never import t5x_lite.tasks; checkpoints, '
      'decoding, data, layers and ops never import t5x_lite.models):\n'
      + '\n'.join(s['upward imports']))


def test_checker_finds_a_cycle_and_an_upward_import(tmp_path):
  files = {
      '__init__.py': '',
      'a.py': 'def f():\n  from pkg import b\n',
      'b.py': 'from . import c\n',
      'c.py': 'import pkg.a\n',
      'main.py': "if __name__ == '__main__':\n  from pkg import b\n",
      'data/__init__.py': '',
      'data/x.py': 'from ..models.m import Model\nimport numpy\n',
      'models/__init__.py': '',
      'models/m.py': 'import importlib\nimportlib.import_module("pkg.tasks")\n',
      'tasks/__init__.py': 'from pkg.data import x\n',
  }
  for name, text in files.items():
    (tmp_path / 'pkg' / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / 'pkg' / name).write_text(textwrap.dedent(text))
  graph = build_graph(find_modules(str(tmp_path / 'pkg'), 'pkg'))
  assert graph['pkg.a'] == {'pkg.b'}  # inside a function
  assert graph['pkg.main'] == set()  # the __main__ section does not count
  assert graph['pkg.data.x'] == {'pkg.models', 'pkg.models.m'}  # relative, with its package
  rules = ((lambda m: m.startswith('pkg.data'), 'pkg.models'),
           (lambda m: not m.startswith('pkg.tasks'), 'pkg.tasks'))
  s = summary(graph, rules)
  assert s['cycles'] == [['pkg.a', 'pkg.b', 'pkg.c'],
                         ['pkg.data.x', 'pkg.models.m', 'pkg.tasks']]
  assert s['upward imports'] == ['pkg.data.x -> pkg.models', 'pkg.data.x -> pkg.models.m',
                                 'pkg.models.m -> pkg.tasks']
  assert _figures(s) == '10 modules, 8 import edges, 2 cycles, 3 upward imports'
  # The package's own rules: entry points and the registry may import anything.
  edges = {'t5x_lite.trainer': {'t5x_lite.tasks.glue'},
           't5x_lite.data.pipeline': {'t5x_lite.models.base'},
           't5x_lite.models.common': {'t5x_lite.decoding'},
           't5x_lite.train': {'t5x_lite.tasks', 't5x_lite.models.base'},
           't5x_lite.tasks.glue': {'t5x_lite.models.base'}}
  assert forbidden_edges(edges, RULES) == ['t5x_lite.data.pipeline -> t5x_lite.models.base',
                                           't5x_lite.trainer -> t5x_lite.tasks.glue']


if __name__ == '__main__':
  s = summary(package_graph())
  for c in s['cycles']:
    print('cycle:', ' <-> '.join(c))
  for e in s['upward imports']:
    print('upward:', e)
  print(_figures(s))
