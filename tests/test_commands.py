"""Every command the README and the gin files' comments print parses as given:
its gin files are found and its `--gin.` flags bind (nothing is trained), and
its other flags are ones the entry point reads."""

import importlib.util
import os
import re
import shlex

import gin
import pytest

from conftest import REPO
from t5x_lite import gin_utils

# Placeholders the docs use for what a user fills in.
PLACEHOLDERS = {'<step>': '10', '<gin>': 't5_tiny_span', 'GIN': 'gin/t5_tiny_span.gin',
                'TOPOLOGY': 'v3:4x4', 'N': '3', 'my_run.gin': 'gin/t5_tiny_span.gin'}
_PLACEHOLDER = re.compile(r'(?<!\w)(' + '|'.join(map(re.escape, PLACEHOLDERS)) + r')(?!\w)')
COMMAND = re.compile(r'^(?:\S+=\S+ )*(?:\.venv/bin/)?python (-m t5x_lite\.[\w.]+|benchmarks/\w+\.py)\b')


def _readme_walk():
  """benchmarks/readme_walk.py, whose reading of the README's blocks this shares."""
  spec = importlib.util.spec_from_file_location('readme_walk', f'{REPO}/benchmarks/readme_walk.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _readme_commands() -> list[str]:
  """The commands in README.md: its fenced blocks' lines (continuations
  joined) and its inline code that is a command."""
  text = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
  commands = [line for _, line in _readme_walk().fenced_lines(text) if COMMAND.match(line)]
  for span in re.findall(r'`([^`]+)`', re.sub(r'^```.*?^```', '', text,
                                              flags=re.MULTILINE | re.DOTALL)):
    span = ' '.join(span.split())
    if COMMAND.match(span):  # a command in the prose
      commands.append(span)
  return commands


def _gin_comment_flags() -> list[tuple[str, str]]:
  """(gin file, its comments' `--gin_file` / `--gin.` flags) for each gin file
  whose comments give flags (a full command or a sentence naming one flag)."""
  found = []
  for root in ('gin', 'configs'):
    for dirpath, _, names in os.walk(os.path.join(REPO, root)):
      for name in sorted(names):
        path = os.path.join(dirpath, name)
        comments = ' '.join(l.lstrip('#').strip().rstrip('\\') for l in open(path)
                            if l.startswith('#'))
        flags = re.findall(r'--gin(?:_file=|\.)[\w./]+=?(?:"[^"]*"|\'[^\']*\'|[^\s,;`)]*)', comments)
        if flags:
          found.append((os.path.relpath(path, REPO), ' '.join(f.rstrip('.') for f in flags)))
  return found


def _options_read_by(module: str) -> set[str]:
  """The non-gin `--name` options an entry point's source reads."""
  path = os.path.join(REPO, module.replace('.', '/') + '.py') if '/' not in module else module
  source = open(os.path.join(REPO, path), encoding='utf-8').read()
  names = set(re.findall(r"add_argument\(\s*'--(\w+)'", source))
  names |= set(re.findall(r"pop(?:_option)?\((?:argv, )?'(\w+)'", source))
  names |= set(re.findall(r"startswith\('--(\w+)=", source))
  return names


def _check(argv: list[str], module: str) -> None:
  gin_args, other = [], []
  for arg in argv:
    (gin_args if arg.startswith(('--gin_file', '--gin.')) else other).append(arg)
  for arg in other:
    name = arg.lstrip('-').partition('=')[0]
    assert arg.startswith('--') and name in _options_read_by(module), (
        f'{module} reads no option {arg!r}')
  if not gin_args:
    return
  gin.clear_config()
  try:
    gin_utils.parse_gin(*gin_utils.parse_flags(gin_args))
  finally:
    gin.clear_config()


def _run_config(word: str) -> str:
  """`--gin_file=runs/NAME/config.gin` (what a documented run writes) as the
  gin file whose MODEL_DIR is runs/NAME."""
  found = re.fullmatch(r'--gin_file=(runs/[\w.-]+)/config\.gin', word)
  if not found:
    return word
  for name in sorted(os.listdir(os.path.join(REPO, 'gin'))):
    text = open(os.path.join(REPO, 'gin', name), encoding='utf-8').read()
    if re.search(rf"^MODEL_DIR = '{re.escape(found[1])}'$", text, flags=re.MULTILINE):
      return f'--gin_file=gin/{name}'
  raise AssertionError(f'no gin file writes {found[1]}, which {word} reads')


def _argv(command: str) -> tuple[str, list[str]]:
  words = shlex.split(re.sub(r'\[(--[^\]]+)\]', r'\1', command))  # [--optional=X]
  while '=' in words[0]:  # VAR=value before the command
    words.pop(0)
  words.pop(0)  # python
  module = words.pop(1) if words[0] == '-m' else words[0]
  words = words[1:]
  words = [_run_config(_PLACEHOLDER.sub(lambda m: PLACEHOLDERS[m[1]], w)) for w in words
           if w not in ('...', '--gin.NAME=VALUE')]  # a usage line's generic parts
  if module.startswith('t5x_lite.data.') or module == 't5x_lite.import_hf':
    return module, []  # argparse tools whose positional examples the docs abbreviate
  return module, [w for w in words if w.startswith('--')]


README_COMMANDS = _readme_commands()
GIN_COMMENTS = _gin_comment_flags()


def test_the_docs_give_commands():
  assert len(README_COMMANDS) >= 30, README_COMMANDS
  assert len(GIN_COMMENTS) > 10, GIN_COMMENTS


@pytest.mark.parametrize('command', README_COMMANDS)
def test_readme_command_parses(command):
  module, argv = _argv(command)
  _check(argv, module)


@pytest.mark.parametrize('path,flags', GIN_COMMENTS, ids=[p for p, _ in GIN_COMMENTS])
def test_gin_comment_flags_parse(path, flags):
  module, argv = _argv(f'python -m t5x_lite.train --gin_file={path} {flags}')
  _check(argv, module)


def test_a_bare_path_is_read_as_a_string(capsys):
  _, bindings = gin_utils.parse_flags(['--gin_file=a.gin', '--gin.CHECKPOINT_PATH=runs/x/10',
                                       "--gin.MODEL_DIR='/q'", '--gin.TRAIN_STEPS=5'])
  assert bindings == ["CHECKPOINT_PATH = 'runs/x/10'", "MODEL_DIR = '/q'", 'TRAIN_STEPS = 5']
  assert capsys.readouterr().err == (
      "note: --gin.CHECKPOINT_PATH=runs/x/10 is read as the string 'runs/x/10' "
      '(gin spelling: --gin.CHECKPOINT_PATH="\'runs/x/10\'")\n')
