"""Command-line handling shared by the entry points: `--gin_file` (repeatable),
`--gin.NAME=VALUE` overrides, and one-line errors for user mistakes."""

import difflib
import importlib
import inspect
import logging
import os
import re
import sys
from typing import Any, Callable, Iterable, Sequence

import gin
from gin import config_parser

from t5x_lite import ops
from t5x_lite.data import bart_noise
from t5x_lite.data import settings as data_settings
from t5x_lite.data import system_messages
from t5x_lite.errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

USAGE = ('usage: python -m t5x_lite.{name} --gin_file=FILE.gin [--gin_file=MORE.gin ...] '
         "[--gin.NAME=VALUE ...]   e.g. --gin.MODEL_DIR=\"'/tmp/run'\" --gin.TRAIN_STEPS=100")


# A value the shell left unquoted that can only be a path (`runs/t5_base_glue`,
# `/tmp/run`, `~/runs/x`): gin would fail to parse it, so it is read as a string.
_BARE_PATH = re.compile(r'[\w.~-]*/[\w./~+<>@:-]*')


def _value(name: str, value: str) -> str:
  """The gin text of `--gin.NAME=value`: `value` itself, or a bare path quoted
  (said on stderr, so the user learns the gin spelling)."""
  if _BARE_PATH.fullmatch(value):
    print(f"note: --gin.{name}={value} is read as the string '{value}' "
          f'(gin spelling: --gin.{name}="\'{value}\'")', file=sys.stderr)
    return repr(value)
  return value


def parse_flags(argv: Sequence[str], *, require_file: bool = True
                ) -> tuple[list[str], list[str]]:
  """Splits argv into gin files and gin bindings (at least one file, unless
  `require_file=False`)."""
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
      name = name[len('--gin.'):]
      bindings.append(f'{name} = {_value(name, value)}')
    else:
      raise UserError(f"unknown argument '{arg}'; expected --gin_file=... or --gin.NAME=VALUE.")
  if not files and require_file:
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


def one_line(e: Exception, hint: str = '') -> str:
  """Gin's multi-line 'message / In file X, line N / binding' as one line; a
  `hint` ('did you mean ...?') follows the message, before the location."""
  lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
  if not lines:
    return type(e).__name__
  if hint:
    lines[0] = f'{lines[0].rstrip(".")}; {hint}'
  return lines[0] + (f" ({'; '.join(lines[1:])})" if len(lines) > 1 else '')


class _Recorder(config_parser.ParserDelegate):
  """Parses gin text for its statements only, recording each `%NAME` it reads."""

  def __init__(self):
    self.macros = []

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return None

  def macro(self, macro_name):
    self.macros.append(macro_name)
    return None


def _binding_key(statement: config_parser.BindingStatement) -> str:
  """'scope/selector.arg', or a macro's 'scope/NAME'."""
  key = '.'.join(filter(None, (statement.selector, statement.arg_name)))
  return f'{statement.scope}/{key}' if statement.scope else key


def _is_macro(name: str) -> bool:
  """`%a.B` names a gin constant such as `%gin.REQUIRED`; a macro's name has no dot."""
  return '.' not in name.rsplit('/', 1)[-1]


class _Sources:
  """What the gin files (with their includes, in parse order) and the overrides
  say, read statement by statement: where each macro is set last and first
  used, and the imports. Best effort: it stops at text gin could not parse."""

  def __init__(self, paths: Sequence[str], bindings: Sequence[str]):
    self.set_at: dict[str, tuple[str, bool]] = {}  # macro -> (where, in configs/)
    self.used_at: dict[str, tuple[str, bool]] = {}  # macro -> (where first, in configs/)
    self.imports: list[config_parser.ImportStatement] = []
    try:
      for path in paths:
        self._read_file(path)
      for binding in bindings:
        self._read(binding, None, library=False)
    except (SyntaxError, ValueError, OSError, UserError):
      pass  # gin's own error says what is wrong with the text

  def _read_file(self, path: str):
    library = os.path.abspath(path).startswith(os.path.join(REPO_ROOT, 'configs') + os.sep)
    with open(path) as f:
      self._read(f.read(), path, library)

  def _read(self, text: str, path: str | None, library: bool):
    recorder = _Recorder()
    for statement in config_parser.ConfigParser(text, recorder):
      if path:
        where = f'{path}:{statement.location.line_num}'
      elif isinstance(statement, config_parser.BindingStatement):
        where = f'--gin.{_binding_key(statement)}'
      else:
        where = '--gin_bindings'
      for name in recorder.macros:
        first, in_library = self.used_at.get(name, (where, False))
        self.used_at[name] = (first, in_library or library)
      recorder.macros.clear()
      if isinstance(statement, config_parser.IncludeStatement):
        self._read_file(find_gin_file(statement.filename))
      elif isinstance(statement, config_parser.ImportStatement):
        self.imports.append(statement)
      elif isinstance(statement, config_parser.BindingStatement) and not statement.arg_name:
        name = _binding_key(statement)
        self.set_at.pop(name, None)  # keep the order of the last setting
        self.set_at[name] = (where, library)

  def modules(self) -> Iterable[tuple[str, Any]]:
    """(the prefix a gin selector writes, the module) for each import."""
    for statement in self.imports:
      if statement.module.startswith('__gin__'):
        continue
      prefix = statement.bound_name() if statement.is_from or statement.alias else statement.module
      try:
        yield prefix, importlib.import_module(statement.module)
      except ImportError:
        continue


def _config_macros() -> tuple[list[str], set[str]]:
  """The macros the parsed config sets, and the names its bindings (and macro
  values) refer to with `%NAME`, read from `gin.config_str()`; none of either
  when a value bound from Python does not print as gin text."""
  recorder, defined = _Recorder(), []
  try:
    for statement in config_parser.ConfigParser(gin.config_str(), recorder):
      if isinstance(statement, config_parser.BindingStatement) and not statement.arg_name:
        defined.append(_binding_key(statement))
  except (SyntaxError, ValueError):
    return [], set()
  return defined, set(recorder.macros)


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
  """'did you mean X?' for the closest candidate (ignoring case), or ''."""
  by_key = {c.lower(): c for c in candidates if c != name}
  match = difflib.get_close_matches(name.lower(), list(by_key), n=1)
  return f'did you mean {by_key[match[0]]}?' if match else ''


def _check_macros(sources: _Sources) -> None:
  """A macro that is set but used by no binding is a typo (or dead): an error
  when it is set on the command line or in a gin file outside configs/. The
  configs/ files are building blocks that set and use macros for one another (a
  model file's MODEL for a run file, a run file's DROPOUT_RATE for a model
  file), so a block parsed alone may leave one unused, or use one it does not
  set. A `%NAME` that nothing sets is an error too, outside configs/."""
  defined, used = _config_macros()
  unset = sorted(n for n in used if _is_macro(n) and n not in defined
                 and not sources.used_at.get(n, ('', True))[1])
  if unset:
    name = unset[0]
    fix = _did_you_mean(name, defined) or f'set it, e.g. --gin.{name}=VALUE.'
    raise UserError(f'gin: %{name} ({sources.used_at[name][0]}) refers to a macro that is '
                    f'never set; {fix}')
  unused = [n for n, (_, library) in sources.set_at.items()
            if n in defined and n not in used and not library]
  if unused:
    name, (where, _) = unused[0], sources.set_at[unused[0]]
    hint = _did_you_mean(name, [n for n in used if _is_macro(n)])
    others = f" (also unused: {', '.join(unused[1:])})" if unused[1:] else ''
    fix = hint or f'remove it, or refer to it as %{name} in a binding.'
    raise UserError(f'gin: macro {name} ({where}) is used by no binding; {fix}{others}')


def _registered_selectors() -> list[str]:
  """The configurables registered with `@gin.configurable` (not through a gin
  file's imports). Gin has no public listing of its registry: this is the one
  place that reads it (`gin.config._REGISTRY`), for suggestions only."""
  registry = getattr(gin.config, '_REGISTRY', None)
  if registry is None:
    return []
  return [c.selector for _, c in registry.items()
          if c.import_source is None and c.module != 'gin']


def _resolve(selector: str, sources: _Sources) -> Any:
  """The function or class a gin selector names, or None."""
  selector = selector.rsplit('/', 1)[-1]
  for prefix, module in sources.modules():
    if selector.startswith(prefix + '.'):
      obj = module
      for attr in selector[len(prefix) + 1:].split('.'):
        obj = getattr(obj, attr, None)
      if obj is not None:
        return obj
  try:
    return gin.get_configurable(selector)
  except (KeyError, ValueError):
    return None


def _parameters(fn: Any) -> list[str]:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return []
  return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _configurable_names(sources: _Sources) -> set[str]:
  """Every `module.name` a binding could configure: the members of the gin
  files' imported modules and the registered configurables."""
  names = set(_registered_selectors())
  for prefix, module in sources.modules():
    names.update(f'{prefix}.{attr}' for attr, value in vars(module).items()
                 if not attr.startswith('_') and callable(value))
  return names


def _name_hint(message: str, paths: Sequence[str], bindings: Sequence[str]) -> str:
  """'did you mean ...?' for gin's unknown-parameter and unknown-configurable errors."""
  if m := re.match(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", message):
    selector, name = m.groups()
    return _did_you_mean(name, _parameters(_resolve(selector, _Sources(paths, bindings))))
  if m := re.match(r"No configurable matching (?:reference '@)?'?([\w./]+)", message):
    scope, _, selector = m.group(1).rpartition('/')
    hint = _did_you_mean(selector, _configurable_names(_Sources(paths, bindings)))
    return hint.replace('mean ', f'mean {scope}/', 1) if hint and scope else hint
  return ''


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


def macro(name: str) -> Any:
  """The value gin's macro `name` is set to (a reference evaluated), or None
  when it is not set (or is %gin.REQUIRED)."""
  try:
    value = gin.query_parameter(f'%{name}')
  except ValueError:
    return None
  if isinstance(value, gin.config.ConfigurableReference):  # @fn() (or %gin.REQUIRED)
    fn = value.scoped_configurable_fn
    with gin.config_scope(name):  # as gin evaluates a macro: its bindings are scoped by it
      value = fn() if value.evaluate else fn
  return None if value is gin.REQUIRED else value


def parse_gin(files: Sequence[str], bindings: Sequence[str], *,
              check_required: bool = True) -> None:
  """Parses gin files (each may `include` configs/...) and then the overrides,
  and applies the run's kernel setting (see `kernels`) and data settings (the
  bound `glue_sources.data_settings`, `bart_noise.bart_denoise` and
  `system_messages.data_settings` arguments, passed to
  `t5x_lite.data.settings.use`). `check_required=False` leaves a
  `%gin.REQUIRED` value unset (for a reader of the data settings only, such as
  `show_task`, which needs no checkpoint path)."""
  for search_path in (os.getcwd(), REPO_ROOT):
    gin.add_config_file_search_path(search_path)
  paths = [find_gin_file(f) for f in files]
  try:
    gin.parse_config_files_and_bindings(paths, bindings, finalize_config=False)
  except UserError as e:  # raised by a module a gin file imports
    raise UserError(f'gin: {one_line(e)}') from None
  except (ValueError, KeyError, SyntaxError, ImportError, AttributeError, TypeError) as e:
    first_line = (str(e).strip().splitlines() or [''])[0]
    message = one_line(e, _name_hint(first_line, paths, bindings))
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
  _check_macros(_Sources(paths, bindings))
  unset = re.findall(r'^(\w+) = %gin\.REQUIRED$', gin.config_str(), flags=re.MULTILINE)
  if unset and check_required:
    raise UserError(f"gin: {', '.join(unset)} must be set (%gin.REQUIRED in the config); "
                    f'bind each in a gin file or with --gin.{unset[0]}=VALUE.')
  try:
    ops.set_kernels(kernels())
  except ValueError as e:
    raise UserError(f'gin: ops.kernels.name: {e}') from None
  system = data_settings.system_message_settings(
      **_bound(data_settings.system_message_settings))
  if system.message is None and system.sample_from is not None:
    system_messages.get_set(system.sample_from)  # an unknown set is one line now
  data_settings.use(glue=data_settings.data_settings(**_bound(data_settings.data_settings)),
                    bart_denoise=_bound(bart_noise.bart_denoise), system_messages=system)


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
