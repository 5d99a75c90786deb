"""The README as a new user meets it: on a fresh clone with no ../shared beside
it, the Quick start's commands run as printed (training shortened to two
steps, by benchmarks/readme_walk.py) and succeed; a documented command whose
data is absent stops in one line naming the directory and the setting that
supplies it; infer reads a plain input file with no dataset present."""

import importlib.util
import json
import os
import subprocess

import pytest

from conftest import REPO, run_env


def _readme_walk():
  spec = importlib.util.spec_from_file_location('readme_walk', f'{REPO}/benchmarks/readme_walk.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


WALK = _readme_walk()


@pytest.fixture(scope='module')
def clone(tmp_path_factory):
  """A clone of the committed repo in a directory with no shared/ beside it,
  and the environment a walk runs its commands in."""
  path = str(tmp_path_factory.mktemp('newcomer') / 't5x_lite')
  subprocess.run(['git', 'clone', '-q', '--depth', '1', f'file://{REPO}', path], check=True)
  assert not os.path.exists(os.path.join(os.path.dirname(path), 'shared'))
  env = run_env()  # the suite's compilation and corpus caches
  env.update({k: v for k, v in WALK.environment(path).items()
              if k in ('PATH', 'PYTHONPATH') or k.startswith('T5X_LITE_')})
  for k in ('MAKEFLAGS', 'MAKELEVEL', 'MFLAGS'):  # a newcomer's shell is not inside make
    env.pop(k, None)
  return path, env


def _command(section, start):
  """The README's command under `section` that begins with `start`."""
  found = [c for s, c in WALK.readme_commands(os.path.join(REPO, 'README.md'), (section,))
           if c.startswith(start)]
  assert found, (section, start)
  return found[0]


def _run(clone, command):
  path, env = clone
  shell, _ = WALK.plan(command, path, os.path.join(path, 'walk_scratch'))
  code, _, output = WALK.run_one(shell, path, env, timeout=300)
  return code, output


@pytest.mark.slow
def test_quick_start_then_infer_from_a_file_without_shared_data(clone):
  path, env = clone
  rows = WALK.walk(path, ('Quick start',), timeout=300, env=env)
  assert [(r['command'], r['exit']) for r in rows] == [
      ('make train', '0'), ('make test', 'skipped'),
      ('python -m t5x_lite.train --gin_file=gin/t5_tiny_span.gin', '0')], rows
  assert rows[0]['with'].startswith("ARGS='--gin.TRAIN_STEPS=2 ")
  assert os.path.isdir(os.path.join(path, 'runs', 't5_tiny_span', 'checkpoints', '2'))
  assert rows[0]['last'].startswith('done: step 2, loss '), rows[0]
  # The same run again: it resumes at step 2, which is TRAIN_STEPS.
  assert rows[2]['last'].endswith('TRAIN_STEPS=2; nothing to do.'), rows[2]

  # Infer on the quick start's checkpoint, from a file alone.
  with open(os.path.join(path, 'lines.txt'), 'w') as f:
    f.write('The module defines a class\nReturn the\n')
  code, output = _run(clone, (
      'python -m t5x_lite.infer --gin_file=configs/runs/infer.gin '
      '--gin_file=runs/t5_tiny_span/config.gin '
      """--gin.CHECKPOINT_PATH="'runs/t5_tiny_span'" --gin.INPUT_FILE="'lines.txt'\""""))
  assert code == '0', output[-3000:]
  (written,) = os.listdir(os.path.join(path, 'runs', 't5_tiny_span', 'infer'))
  with open(os.path.join(path, 'runs', 't5_tiny_span', 'infer', written)) as f:
    rows = [json.loads(line) for line in f]
  assert [r['line'] for r in rows] == [1, 2], rows
  assert all(isinstance(r['outputs'], str) for r in rows)


def test_instruction_tuning_without_its_samples_names_the_directory(clone):
  path, _ = clone
  code, output = _run(clone, _command('Instruction tuning', 'python -m t5x_lite.train'))
  expected = os.path.join(os.path.dirname(path), 'shared', 'data', 'instructions')
  assert code == '2', output[-3000:]  # a UserError's exit status
  assert 'Traceback' not in output, output[-3000:]
  last = WALK.last_line(output)
  assert last.startswith('error: ') and expected in last, last
  assert 'T5X_LITE_INSTRUCTIONS_DIR' in last, last
