"""Command-line handling shared by the entry points: `--gin_file` (repeatable),
`--gin.NAME=VALUE` overrides, and one-line errors for user mistakes."""

import logging
import os
import re
import sys
from typing import Callable, Sequence

import gin

from t5x_lite import ops
from t5x_lite.data import bart_noise
from t5x_lite.data import settings as data_settings
from t5x_lite.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USAGE = ('usage: python -m t5x_lite.{name} --gin_file=FILE.gin [--gin_file=MORE.gin ...] '
         "[--gin.NAME=VALUE ...]   e.g. --gin.MODEL_DIR=\"'/tmp/run'\" --gin.TRAIN_STEPS=100")


def parse_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits argv into gin files and gin bindings."""
  files, bindings = [], []
  args = list(argv)
  while args:
    arg = args.pop(0)
    name, has_value, value = arg.partition('=')
    if name in ('--gin_file', '--gin_bindings') and not has_value:
      if not args:
        raise UserError(f'{name} needs a value.')
      value = args.pop(0)
    if name == '--gin_file':
      files.append(value)
    elif name == '--gin_bindings':
      bindings.append(value)
    elif name.startswith('--gin.') and has_value:
      bindings.append(f'{name[len("--gin."):]} = {value}')
    else:
      raise UserError(f"unknown argument '{arg}'; expected --gin_file=... or --gin.NAME=VALUE.")
  if not files:
    raise UserError('no --gin_file given; e.g. --gin_file=gin/t5_tiny_span.gin.')
  return files, bindings


def find_gin_file(path: str) -> str:
  places = list(dict.fromkeys((os.getcwd(), REPO_ROOT)))
  for base in places:
    candidate = os.path.join(base, path)
    if os.path.isfile(candidate):
      return candidate
  raise UserError(f"gin file '{path}' not found (looked in {' and '.join(places)}); "
                  'check the --gin_file path.')


def one_line(e: Exception) -> str:
  """Gin's multi-line 'message / In file X, line N / binding' as one line."""
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  if not lines:
    return type(e).__name__
  return lines[0] + (f" ({'; '.join(lines[1:])})" if len(lines) > 1 else '')


@gin.configurable('kernels', module='ops')
def kernels(name: str = 'auto') -> str:
  """The model kernels of a run, `--gin.ops.kernels.name="'plain'"`: 'auto',
  'plain' or 'cpu' (see t5x_lite.ops); applied by `parse_gin`."""
  return name


def _bound(fn: Callable) -> dict:
  """The arguments the parsed gin files bind for `fn`; {} when none mentions it."""
  try:
    return gin.get_bindings(fn)
  except ValueError:
    return {}


def parse_gin(files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files (each may `include` configs/...) and then the overrides,
  and applies the run's kernel setting (see `kernels`) and data settings (the
  bound `glue_sources.data_settings` and `bart_noise.bart_denoise` arguments,
  passed to `t5x_lite.data.settings.use`)."""
  for search_path in (os.getcwd(), REPO_ROOT):
    gin.add_config_file_search_path(search_path)
  paths = [find_gin_file(f) for f in files]
  try:
    gin.parse_config_files_and_bindings(paths, bindings, finalize_config=False)
  except UserError as e:  # raised by a module a gin file imports
    raise UserError(f'gin: {one_line(e)}') from None
  except (ValueError, KeyError, SyntaxError, ImportError, AttributeError, TypeError) as e:
    message = one_line(e)
    old_registry = re.match(r"No module named 'tasks(\.\w+)*'", message)
    if isinstance(e, ImportError) and old_registry:
      message = ('the task registry is `t5x_lite.tasks`: write `import t5x_lite.tasks` instead '
                 f'of `import tasks`.{message[old_registry.end():]}')
    missing = re.search(r"In file \"([^\"]+)\", line (\d+); include '([^']+)'", message)
    if isinstance(e, TypeError) and missing:  # gin fails on an include it cannot find
      where, line, name = missing.groups()
      message = (f"{where}:{line} includes '{name}', which is not found (looked in "
                 f'{os.getcwd()} and {REPO_ROOT}); fix the include path.')
    raise UserError(f'gin: {message}') from None
  unset = re.findall(r'^(\w+) = %gin\.REQUIRED$', gin.config_str(), flags=re.MULTILINE)
  if unset:
    raise UserError(f"gin: {', '.join(unset)} must be set (%gin.REQUIRED in the config); "
                    f'bind each in a gin file or with --gin.{unset[0]}=VALUE.')
  try:
    ops.set_kernels(kernels())
  except ValueError as e:
    raise UserError(f'gin: ops.kernels.name: {e}') from None
  data_settings.use(glue=data_settings.data_settings(**_bound(data_settings.data_settings)),
                    bart_denoise=_bound(bart_noise.bart_denoise))


def call_configured(fn: Callable, argv: Sequence[str]) -> None:
  """An entry point's main: join the other hosts, parse the gin flags, call `fn`
  with its gin bindings."""
  from t5x_lite import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize('auto')  # before anything touches the devices
  parse_gin(*parse_flags(argv))
  gin.get_configurable(fn)()


def run(main: Callable[[Sequence[str]], None], name: str) -> None:
  """Runs an entry point; a UserError prints one line and exits with status 2."""
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  argv = sys.argv[1:]
  if any(a in ('-h', '--help') for a in argv):
    print(USAGE.format(name=name))
    return
  try:
    main(argv)
  except UserError as e:
    # Gin appends "In call to configurable ..." lines; the message is the first.
    print(f'error: {str(e).strip().splitlines()[0]}', file=sys.stderr)
    sys.exit(2)
