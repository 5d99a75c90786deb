"""The README walk: every command of README.md's ```sh blocks run as printed,
in order, on a clone of the repo, as a new user would; prints a markdown table
of each command's exit code and last non-empty output line.

    python benchmarks/readme_walk.py [--clone=DIR] [--no_shared] [--timeout=300]
        [--section='Quick start'] [--output=walk.md]

Without `--clone`, a fresh `git clone` of this repo in a temporary directory,
with `../shared` beside it (a link to this checkout's) or, with `--no_shared`,
without it. Each command runs in the clone with this interpreter's venv first
on PATH (`python` and `make` find it) and PYTHONPATH=<clone>; `make` is told
to use that venv and not to reinstall it. The built-in instruction and
preference tasks read `<clone>/../shared/...` (set through
T5X_LITE_INSTRUCTIONS_DIR / T5X_LITE_PREFERENCES_DIR, because the venv's
editable install maps `t5x_lite.tasks` to its own checkout). The embedded
corpus is built once and cached for the walk (T5X_LITE_CORPUS_CACHE).

Training is shortened by appended flags (`--gin.TRAIN_STEPS=2`, checkpoints
every 2 steps, no periodic evaluation), so a later command's
`checkpoints/<N>` reads `checkpoints/2`; benchmarks run a step or two. A
command that cannot run here (a GPU, the whole test suite, a base-size model
at its paper's batch, a placeholder path) is listed with why, not run.
"""

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.dirname(os.path.dirname(sys.executable))

# Appended to a command of each entry point, for the macros its gin files set.
SHORTER = {
    't5x_lite.train': {'TRAIN_STEPS': '2', 'CHECKPOINT_PERIOD': '2', 'EVAL_PERIOD': '0'},
    't5x_lite.eval': {'EVAL_NUM_EXAMPLES': '8'},
    't5x_lite.self_instruct': {'NUM_ROUNDS': '1'},
}
# Non-gin options given a smaller value (replaced in place, else appended).
SHORTER_OPTIONS = {
    't5x_lite.benchmark': {'steps': '2'},
    'benchmarks/hf_reference.py': {'steps': '2', 'rounds': '1'},
    't5x_lite.layout_bench': {'steps': '1'},
}
# (pattern in the printed command, why it is not run).
SKIP = [
    (r'^make test\b', 'the whole test suite (about 15 min on 2 cores); CI runs it'),
    (r'--device=gpu', 'needs a GPU'),
    (r'/path/to/', 'a placeholder path'),
    (r'\bmy_run\.gin\b', "my_run.gin stands for the reader's own gin file"),
    (r't5x_lite\.train .*gin/(t5_base_span|bert_base_mlm|bart_base_denoise|gpt2_small_lm)\.gin',
     "a base-size model at its paper's batch: a TPU recipe"),
    (r'runs/t5_base_(span|glue)\b', 'reads a run of the base-size recipe, which is skipped'),
]
PROMPTS = 'a gorgeous film .\nWrite a function that adds two numbers.\n'


def fenced_lines(text: str, language: str | None = None) -> list[tuple[str, str]]:
  """(section, line) for each line of the text's fenced blocks (of `language`
  only, if given), continuation lines joined and ` # ` comments dropped; the
  section is the heading (`## ...` / `### ...`) the block is under."""
  found, section = [], ''
  pattern = r'^(#{2,3}) ([^\n]*)$|^```([a-z]*)\n(.*?)^```'
  for m in re.finditer(pattern, text, flags=re.MULTILINE | re.DOTALL):
    if m[1]:
      section = m[2].strip()
      continue
    if language is not None and m[3] != language:
      continue
    for line in re.sub(r'\\\n\s*', ' ', m[4]).splitlines():
      line = line.split(' # ')[0].strip()
      if line and not line.startswith('#'):
        found.append((section, line))
  return found


def readme_commands(readme: str = os.path.join(REPO, 'README.md'),
                    sections: tuple[str, ...] = ()) -> list[tuple[str, str]]:
  """(section, command) for each line of README's ```sh blocks (those under
  `sections` only, if given)."""
  with open(readme, encoding='utf-8') as f:
    lines = fenced_lines(f.read(), 'sh')
  return [(s, c) for s, c in lines if not sections or s in sections]


def _module(words: list[str]) -> str:
  """The entry point of a command's words (after any VAR=value)."""
  words = [w for w in words if not re.match(r'^\w+=', w)]
  if words[:2] == ['python', '-m']:
    return words[2]
  return words[1] if words[0] == 'python' else words[0]


def _gin_text(clone: str, words: list[str]) -> str:
  """The command's gin files and the files they include, as one text."""
  todo = [w.split('=', 1)[1] for w in words if w.startswith('--gin_file=')]
  text, seen = '', set()
  while todo:
    path = os.path.join(clone, todo.pop())
    if path in seen or not os.path.exists(path):
      continue
    seen.add(path)
    with open(path, encoding='utf-8') as f:
      body = f.read()
    text += body
    todo += re.findall(r"^include '([^']+)'", body, flags=re.MULTILINE)
  return text


def plan(command: str, clone: str, scratch: str) -> tuple[str | None, str]:
  """(the shell command to run, or None; the overrides made, or why skipped)."""
  for pattern, why in SKIP:
    if re.search(pattern, command):
      return None, f'skipped: {why}'
  run = re.sub(r'\s*\[[^\]]*\]', '', command).replace(' ...', '')  # a usage line's options
  words = shlex.split(run)
  module = _module(words)
  extra = []
  if words[0] == 'make':
    extra = [f'VENV={VENV}', '-o', f'{VENV}/.installed']
    if words[1] == 'train':
      gin_words = ['--gin_file=gin/t5_tiny_span.gin']  # the Makefile's
      macros = _macro_flags('t5x_lite.train', _gin_text(clone, gin_words))
      extra.append('ARGS=' + shlex.quote(' '.join(macros)))
    return f"{run} {' '.join(extra)}", ' '.join(extra[3:]) or 'venv: ' + VENV
  extra += _macro_flags(module, _gin_text(clone, words))
  notes = []
  for name, value in SHORTER_OPTIONS.get(module, {}).items():
    if re.search(rf'--{name}=\S+', run):
      run = re.sub(rf'--{name}=\S+', f'--{name}={value}', run)
    else:
      run += f' --{name}={value}'
    notes.append(f'--{name}={value}')
  for word in words:
    found = re.fullmatch(r"--gin\.(\w+)='(/tmp/[^']*)'", word)  # a run outside the clone
    if found:
      extra.append(f"--gin.{found[1]}=\"'{scratch}{found[2]}'\"")
    found = re.fullmatch(r"--gin\.(\w+)='([^']*/checkpoints/)(\d+)'", word)
    if found and int(found[3]) > 2:  # the step of a full run: the shortened run's last
      extra.append(f"--gin.{found[1]}=\"'{found[2]}2'\"")
    found = re.fullmatch(r"--gin\.INPUT_FILE='([^']+)'", word)
    if found and not os.path.exists(os.path.join(clone, found[1])):
      with open(os.path.join(clone, found[1]), 'w', encoding='utf-8') as f:
        f.write(PROMPTS)
      notes.append(f'{found[1]}: two lines written by the walk')
  return ' '.join([run] + extra), ' '.join(notes + extra)


def _macro_flags(module: str, gin_text: str) -> list[str]:
  return [f'--gin.{name}={value}' for name, value in SHORTER.get(module, {}).items()
          if re.search(rf'^{name} =', gin_text, flags=re.MULTILINE)]


def environment(clone: str, corpus_cache: str | None = None) -> dict:
  env = dict(os.environ)
  env['PATH'] = f"{VENV}/bin:{env.get('PATH', '')}"
  env['PYTHONPATH'] = clone
  data = os.path.join(os.path.dirname(os.path.abspath(clone)), 'shared', 'data')
  env['T5X_LITE_INSTRUCTIONS_DIR'] = os.path.join(data, 'instructions')
  env['T5X_LITE_PREFERENCES_DIR'] = os.path.join(data, 'preferences')
  if corpus_cache:
    env['T5X_LITE_CORPUS_CACHE'] = corpus_cache
  return env


def last_line(output: str) -> str:
  """The last non-empty line (a progress bar's last state), without colours."""
  output = re.sub(r'\x1b\[[0-9;]*[A-Za-z]', '', output)
  lines = [l.strip() for l in re.split(r'[\r\n]', output) if l.strip()]
  return lines[-1] if lines else ''


def run_one(shell: str, clone: str, env: dict, timeout: float) -> tuple[str, float, str]:
  """(exit code or 'timeout', seconds, output: stdout and stderr) of one command."""
  start = time.time()
  with subprocess.Popen(['bash', '-c', shell], cwd=clone, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, errors='replace',
                        start_new_session=True) as proc:
    try:
      output, _ = proc.communicate(timeout=timeout)
      code = str(proc.returncode)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, 9)
      output, _ = proc.communicate()
      code = 'timeout'
  return code, time.time() - start, output


def walk(clone: str, sections: tuple[str, ...] = (), timeout: float = 300,
         env: dict | None = None, echo=None) -> list[dict]:
  """Each README command's row: section, command, ran with, exit, seconds, last line."""
  scratch = os.path.join(clone, 'walk_scratch')
  os.makedirs(scratch, exist_ok=True)
  env = env or environment(clone, os.path.join(scratch, 'corpus.json'))
  rows = []
  for section, command in readme_commands(os.path.join(clone, 'README.md'), sections):
    shell, note = plan(command, clone, scratch)
    row = {'section': section, 'command': command, 'with': note, 'exit': 'skipped',
           'seconds': 0.0, 'last': ''}
    if shell:
      row['exit'], row['seconds'], output = run_one(shell, clone, env, timeout)
      row['last'] = last_line(output)
    rows.append(row)
    if echo:
      echo(row)
  return rows


def table(rows: list[dict]) -> str:
  cell = lambda s: str(s).replace('|', '\\|')
  out = ['| # | section | command | ran with | exit | s | last line |',
         '|---|---|---|---|---|---|---|']
  for i, r in enumerate(rows, 1):
    with_, last = (('', r['with'][len('skipped: '):]) if r['exit'] == 'skipped'
                   else (r['with'], r['last']))
    out.append(f"| {i} | {cell(r['section'])} | `{cell(r['command'])}` | {cell(with_)} | "
               f"{r['exit']} | {r['seconds']:.0f} | {cell(last)} |")
  return '\n'.join(out)


def fresh_clone(shared: bool) -> str:
  """A `git clone` of this repo's HEAD in a new temporary directory, with a
  link to ../shared beside it if `shared`."""
  top = tempfile.mkdtemp(prefix='readme_walk_')
  clone = os.path.join(top, 't5x_lite')
  subprocess.run(['git', 'clone', '-q', '--depth', '1', f'file://{REPO}', clone], check=True)
  if shared:
    source = os.path.join(os.path.dirname(REPO), 'shared')
    if not os.path.isdir(source):
      sys.exit(f'error: {source} does not exist; use --no_shared.')
    os.symlink(source, os.path.join(top, 'shared'))
  return clone


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--clone', help='an existing clone (default: a fresh one)')
  parser.add_argument('--no_shared', action='store_true',
                      help='the fresh clone without ../shared beside it')
  parser.add_argument('--timeout', type=float, default=300, help='seconds per command')
  parser.add_argument('--section', action='append', default=[],
                      help="only the blocks under this README heading (e.g. 'Quick start')")
  parser.add_argument('--output', help='also write the table to this file')
  args = parser.parse_args(argv)
  if args.clone:
    clone = os.path.abspath(args.clone)
    beside = os.path.join(os.path.dirname(clone), 'shared')
    if args.no_shared and os.path.exists(beside):
      sys.exit(f'error: --no_shared, but {beside} exists beside --clone.')
  else:
    clone = fresh_clone(shared=not args.no_shared)
  print(f'clone: {clone} ({"no " if args.no_shared else ""}../shared)', flush=True)
  echo = lambda r: print(f"{r['exit']:>8} {r['seconds']:5.0f}s  {r['command'][:70]}  -> "
                         f"{r['last'][:90] or r['with']}", flush=True)
  rows = walk(clone, tuple(args.section), args.timeout, echo=echo)
  text = table(rows)
  print(text)
  if args.output:
    with open(args.output, 'w', encoding='utf-8') as f:
      f.write(text + '\n')
  if not args.clone:
    shutil.rmtree(os.path.dirname(clone), ignore_errors=True)


if __name__ == '__main__':
  main()
