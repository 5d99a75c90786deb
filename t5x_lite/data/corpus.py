"""The embedded default corpus: the Python standard library's own documentation.

Every Python install carries English prose about itself: the help topics in
`pydoc_data.topics` and the docstrings of the standard library's modules,
classes and functions. t5x_lite pretrains on that text when no real corpus
(C4, local files) is provided, so the quick start works on a fresh machine.

Docstrings are read from the `.py` sources with `ast` (no module is imported),
normalised with `inspect.cleandoc`, exact duplicates dropped (first wins) and
very short ones skipped. The order is fixed (topics sorted by key, then files
by path, then definitions in source order), so the corpus is identical across
runs on the same Python version.

Reading the sources takes seconds. A process may name a file in
T5X_LITE_CORPUS_CACHE to keep the documents in: the first process that builds
the corpus writes it there and later ones read it back (the test suite sets it
for the many runs it starts; unset, nothing is cached).
"""

if __name__ == '__main__':  # a run starts here: tune the host first
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare(tensorflow=False)

import ast
import functools
import hashlib
import inspect
import json
import os
import sysconfig
import warnings

MIN_CHARS = 40
VALIDATION_PERCENT = 2
CACHE_ENV = 'T5X_LITE_CORPUS_CACHE'

# Directories under the stdlib that hold tests, test data or third-party code.
_SKIP_DIRS = frozenset({
    'site-packages', 'dist-packages', 'test', 'tests', 'idle_test',
    'idlelib', 'lib2to3', '__pycache__', 'ensurepip', 'turtledemo',
})

_DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_files():
  """Sorted paths (relative to the stdlib root) of the stdlib .py sources."""
  root = sysconfig.get_paths()['stdlib']
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for name in filenames:
      if name.endswith('.py') and not name.startswith('test_'):
        files.append(os.path.relpath(os.path.join(dirpath, name), root))
  return root, sorted(files)


def _docstrings(source):
  """Docstrings of a module's source, in source order (no import)."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # invalid escape sequences in old files
    tree = ast.parse(source)
  docs = []
  for node in ast.walk(tree):
    if isinstance(node, _DEFS):
      doc = ast.get_docstring(node, clean=True)
      if doc:
        docs.append((getattr(node, 'lineno', 0), doc))
  return [doc for _, doc in sorted(docs, key=lambda x: x[0])]


def _raw_documents():
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  for key in sorted(topics.topics):
    yield topics.topics[key]
  root, files = _stdlib_files()
  for rel in files:
    try:
      with open(os.path.join(root, rel), 'rb') as f:
        source = f.read()
      yield from _docstrings(source)
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
      continue


def _read_cache(path):
  try:
    with open(path, encoding='utf-8') as f:
      return tuple(json.load(f))
  except (OSError, ValueError):
    return None


def _write_cache(path, docs):
  """Writes `docs` to `path` whole or not at all (processes may race)."""
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(docs, f)
  os.replace(tmp, path)


@functools.cache
def _documents():
  cache = os.environ.get(CACHE_ENV)
  if cache and (cached := _read_cache(cache)) is not None:
    return cached
  seen = set()
  docs = []
  for doc in _raw_documents():
    doc = inspect.cleandoc(doc).strip()
    if len(doc) < MIN_CHARS or doc in seen:
      continue
    seen.add(doc)
    docs.append(doc)
  if cache:
    _write_cache(cache, docs)
  return tuple(docs)


def embedded_documents():
  """All documents of the embedded corpus (a new list; cached underneath)."""
  return list(_documents())


def is_validation(text):
  """Stable split: a document is validation if its hash falls in ~2%."""
  digest = hashlib.md5(text.encode('utf-8')).digest()
  return int.from_bytes(digest[:4], 'little') % 100 < VALIDATION_PERCENT


@functools.cache
def _split(split):
  if split == 'train':
    return tuple(d for d in _documents() if not is_validation(d))
  if split == 'validation':
    return tuple(d for d in _documents() if is_validation(d))
  from t5x_lite.errors import UserError  # pylint: disable=g-import-not-at-top
  raise UserError(
      f"Unknown split {split!r} of the embedded corpus; use 'train' or "
      "'validation'.")


def split_documents(split):
  """Documents of the 'train' (~98%) or 'validation' (~2%) split."""
  return list(_split(split))


def corpus_stats():
  docs = _documents()
  return {
      'documents': len(docs),
      'characters': sum(len(d) for d in docs),
      'train_documents': len(_split('train')),
      'validation_documents': len(_split('validation')),
  }


if __name__ == '__main__':
  print(corpus_stats())
