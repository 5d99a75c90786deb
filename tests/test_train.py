"""End to end through `python -m t5x_lite.train`: outputs, loss falls, exact
resume after SIGKILL, checkpoint on SIGTERM, 8 fake devices = 1 device, and the
checkpoint faults: damaged files, a changed model, a failed save, an unwritable
MODEL_DIR."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import main_in_process, read_metrics, require_shared_data, run_env, run_train, train_cmd, REPO, SMALL_T5

# Enough steps after each kill point that the signal lands before the run ends.
STEPS = 60
RUN = [f'--gin.TRAIN_STEPS={STEPS}', '--gin.CHECKPOINT_PERIOD=10']


def _final_state(model_dir):
  path = os.path.join(model_dir, 'checkpoints', str(STEPS), 'state')
  return ocp.PyTreeCheckpointer().restore(path)


# Many tests read one uninterrupted run: make test runs this module on one
# xdist worker (conftest.ONE_WORKER_MODULES), which trains it once. The
# learning rate does not depend on TRAIN_STEPS, so its first steps are those
# of any shorter run of the same config.


@pytest.fixture(scope='module')
def uninterrupted_run(tmp_path_factory):
  """(MODEL_DIR, stdout) of a STEPS-step run, saved every 10 steps. Tests that
  run more steps on it copy it first."""
  model_dir = str(tmp_path_factory.mktemp('uninterrupted'))
  return model_dir, run_train(model_dir, *RUN).stdout


@pytest.fixture(scope='module')
def uninterrupted(uninterrupted_run):
  return uninterrupted_run[0]


def test_outputs_and_loss_falls(tmp_path, uninterrupted_run, monkeypatch, capsys):
  model_dir, stdout = uninterrupted_run
  assert f'MODEL_DIR: {model_dir}' in stdout
  rows = read_metrics(model_dir)
  assert [r['step'] for r in rows] == list(range(1, STEPS + 1))
  for key in ('loss', 'accuracy', 'learning_rate', 'tokens_per_second', 'seconds_per_step'):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert rows[0]['learning_rate'] == pytest.approx(1000 ** -0.5)  # WARMUP_STEPS = 1000
  assert rows[39]['loss'] < 0.75 * rows[0]['loss']  # by step 40
  # Saved every 10 steps, the last 3 kept.
  assert sorted(os.listdir(os.path.join(model_dir, 'checkpoints'))) == ['40', '50', '60']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(model_dir, 'train')))
  config = open(os.path.join(model_dir, 'config.gin')).read()
  assert 'emb_dim = 32' in config and f'TRAIN_STEPS = {STEPS}' in config
  again = str(tmp_path / 'again')
  shutil.copytree(model_dir, again)
  code, out, _ = _train_in_process(monkeypatch, capsys, again, f'--gin.TRAIN_STEPS={STEPS}')
  assert code == 0 and 'nothing to do' in out, out


def _wait_for(proc, done, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'train exited early: {proc.returncode}')
    if done():
      return
    time.sleep(0.01)
  raise AssertionError('timed out waiting for training progress')


def _logged_steps(model_dir):
  path = os.path.join(model_dir, 'metrics.jsonl')
  return len(open(path).read().splitlines()) if os.path.exists(path) else 0


def _wait_for_step(proc, model_dir, step):
  _wait_for(proc, lambda: _logged_steps(model_dir) >= step)


def _assert_same_run(model_dir, reference_dir):
  a, b = _final_state(model_dir), _final_state(reference_dir)
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  last, ref_last = read_metrics(model_dir)[-1], read_metrics(reference_dir)[-1]
  assert last['step'] == ref_last['step'] == STEPS
  assert last['loss'] == ref_last['loss']
  assert [r['step'] for r in read_metrics(model_dir)] == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_is_bit_exact(tmp_path, uninterrupted):
  """One run stopped three times: SIGKILL before any checkpoint, SIGKILL right
  after the first checkpoint is final, then SIGTERM in the run resumed from it
  (it saves a checkpoint and exits 143). The run resumed from that checkpoint
  ends where the uninterrupted run does, bit for bit."""
  model_dir = str(tmp_path)
  first_checkpoint = os.path.join(model_dir, 'checkpoints', '10')
  kill_points = [lambda: _logged_steps(model_dir) >= 2,  # before any checkpoint
                 lambda: os.path.isdir(first_checkpoint)]  # right after one is final
  for done in kill_points:
    proc = subprocess.Popen(train_cmd(model_dir, *RUN), cwd=REPO, env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(proc, done)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

  # The resumed run drops the rows logged after its checkpoint: wait for steps
  # past those the killed run logged, so that it is this run that trains.
  past = max(15, _logged_steps(model_dir) + 3)
  proc = subprocess.Popen(train_cmd(model_dir, *RUN), cwd=REPO, env=run_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(proc, model_dir, past)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  assert re.search(r'resumed from \S+/(\d+) \(data position \1, input pipeline restored\)',
                   out), out  # from the SIGKILLed run's checkpoint
  assert 'SIGTERM: saved checkpoint' in out
  saved = int(out.split('SIGTERM: saved checkpoint')[1].split()[0].rsplit('/', 1)[1].rstrip(';'))
  assert past <= saved < STEPS
  assert str(saved) in os.listdir(os.path.join(model_dir, 'checkpoints'))

  resumed = run_train(model_dir, *RUN)
  assert f'/{saved} (data position {saved}, input pipeline restored)' in resumed.stdout
  _assert_same_run(model_dir, uninterrupted)


def test_eight_fake_devices_match_one(tmp_path, uninterrupted_run):
  """data 2 x fsdp 2 x model 2 (configs/meshes/cpu_8_fake.gin) against one
  device (the uninterrupted run's first 3 steps)."""
  eight = str(tmp_path / 'eight')
  proc = run_train(eight, '--gin.TRAIN_STEPS=3', '--gin_file=configs/meshes/cpu_8_fake.gin',
                   devices=8)
  assert "mesh {'data': 2, 'fsdp': 2, 'model': 2}" in proc.stdout
  one, one_stdout = uninterrupted_run
  assert "mesh {'data': 1, 'fsdp': 1, 'model': 1}" in one_stdout
  for a, b in zip(read_metrics(one)[:3], read_metrics(eight), strict=True):
    assert b['loss'] == pytest.approx(a['loss'], rel=1e-5)
    assert b['accuracy'] == pytest.approx(a['accuracy'], rel=1e-5)


def test_initial_checkpoint_path_starts_from_pretrained_params(
    tmp_path, uninterrupted, monkeypatch, capsys):
  pretrained, finetuned = uninterrupted, str(tmp_path / 'finetuned')
  code, out, err = _train_in_process(monkeypatch, capsys, finetuned, '--gin.TRAIN_STEPS=2',
                                     f"--gin.INITIAL_CHECKPOINT_PATH='{pretrained}'")
  assert code == 0, err[-3000:]
  assert f'initialised params from {pretrained}' in out
  first_pretrained, first_finetuned = read_metrics(pretrained)[0], read_metrics(finetuned)[0]
  assert first_finetuned['step'] == 1  # a new run: step and optimizer start afresh
  # Same seed, so the same first batch: only the starting params differ.
  assert first_finetuned['loss'] < first_pretrained['loss'] - 1.0


def test_finetune_then_eval_and_infer_on_sst2_files(tmp_path, uninterrupted, capsys):
  """Fine-tune the pretrained small T5 on SST-2 (original TSV files) with evaluation
  every 3 steps, then `t5x_lite.eval` and `t5x_lite.infer` on the result. Each
  prints every metric once, as a row of the evaluation table. The three mains
  run in this process (the subprocess around them is tested above)."""
  from t5x_lite import eval as eval_lib  # pylint: disable=g-import-not-at-top
  from t5x_lite import infer as infer_lib  # pylint: disable=g-import-not-at-top
  from t5x_lite import train as train_lib  # pylint: disable=g-import-not-at-top
  model_dir = str(tmp_path / 'sst2')
  dims = [a for a in SMALL_T5 if 'T5Config' in a]
  glue = [f"--gin.glue_sources.data_settings.glue_dir='{require_shared_data('glue')}'"]
  main_in_process(train_lib, [
      '--gin_file=gin/t5_tiny_sst2_finetune.gin', *dims, *glue, f"--gin.MODEL_DIR='{model_dir}'",
      '--gin.TRAIN_STEPS=6', '--gin.EVAL_PERIOD=3', '--gin.EVAL_NUM_EXAMPLES=20',
      '--gin.BATCH_SIZE=8', f"--gin.INITIAL_CHECKPOINT_PATH='{uninterrupted}'",
      '--gin.train_script.train.progress_bar=False'])
  stdout = capsys.readouterr().out
  evals = [r for r in read_metrics(model_dir) if 'eval/glue_sst2_v002/accuracy' in r]
  assert [r['step'] for r in evals] == [3, 6]
  assert all(0 <= r['eval/glue_sst2_v002/accuracy'] <= 100 for r in evals)
  assert [l for l in stdout.splitlines() if 'accuracy' in l] == [
      f"eval at step {r['step']}: glue_sst2_v002  accuracy "
      f"{r['eval/glue_sst2_v002/accuracy']:.2f}" for r in evals]
  assert 'compiling the train step ...\n' in stdout
  assert re.search(r'^compiled the train step in \d+\.\ds$', stdout, re.M), stdout
  rows = [json.loads(l) for l in open(os.path.join(model_dir, 'eval', '6', 'glue_sst2_v002.jsonl'))]
  assert len(rows) == 20 and rows[0]['inputs'].startswith('sst2 sentence: ')

  common = ['--gin_file=configs/models/t5_1_1_tiny.gin', *dims, *glue,
            f"--gin.CHECKPOINT_PATH='{model_dir}'", "--gin.MIXTURE_OR_TASK_NAME='glue_sst2_v002'",
            "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 4}", '--gin.BATCH_SIZE=8']
  out = str(tmp_path / 'eval')
  main_in_process(eval_lib, ['--gin_file=configs/runs/eval.gin', *common,
                              f"--gin.MODEL_DIR='{out}'", '--gin.EVAL_NUM_EXAMPLES=20',
                              "--gin.EVAL_MODE='rank'",
                              "--gin.glue_sources.data_settings.source='files'"])
  written = json.load(open(os.path.join(out, 'eval', 'metrics.json')))
  assert set(written['tasks']) == {'glue_sst2_v002'}
  assert 0 <= written['tasks']['glue_sst2_v002']['accuracy'] <= 100
  accuracy = written['tasks']['glue_sst2_v002']['accuracy']
  printed = capsys.readouterr().out
  assert printed.count('accuracy') == 1, printed
  assert printed.splitlines()[-2:] == [
      f'glue_sst2_v002  accuracy {accuracy:.2f}', f'wrote {out}/eval/metrics.json']

  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('sst2 sentence: a gorgeous film .\nsst2 sentence: dull and slow .\n')
  main_in_process(infer_lib, ['--gin_file=configs/runs/infer.gin', *common, '--raw_inputs',
                               f"--gin.MODEL_DIR='{out}'", f"--gin.INPUT_FILE='{prompts}'",
                               "--gin.DECODE={'method': 'beam', 'num_beams': 2}",
                               "--gin.glue_sources.data_settings.source='files'"])
  lines = [json.loads(l) for l in open(os.path.join(out, 'infer', 'prompts.jsonl'))]
  assert [l['inputs'] for l in lines] == ['sst2 sentence: a gorgeous film .',
                                          'sst2 sentence: dull and slow .']
  assert all(isinstance(l['outputs'], str) and np.isfinite(l['score']) for l in lines)


def _readme_block(after):
  text = open(os.path.join(REPO, 'README.md')).read()
  return text.split(after, 1)[1].split('```', 2)[1].split('\n', 1)[1]


def test_readme_own_corpus_recipe(tmp_path):
  """The README's recipe, exactly as written, on a real JSONL sample."""
  sample = require_shared_data('text', 'c4', 'c4_en_train_first1000.jsonl')
  with open(sample) as f, open(tmp_path / 'my_corpus.jsonl', 'w') as out:
    out.writelines(line for _, line in zip(range(300), f))
  (tmp_path / 'my_tasks.py').write_text(_readme_block('Create\n`my_tasks.py`'))
  (tmp_path / 'my_run.gin').write_text(_readme_block('and `my_run.gin`:'))
  overrides = [a for a in SMALL_T5 if not a.startswith('--gin_file')]
  proc = subprocess.run(
      [sys.executable, '-m', 't5x_lite.train', '--gin_file=my_run.gin', *overrides,
       '--gin.TRAIN_STEPS=3'], cwd=tmp_path, env=run_env(), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  model_dir = str(tmp_path / 'runs' / 'my_corpus')
  assert f'MODEL_DIR: {model_dir}' in proc.stdout
  assert [r['step'] for r in read_metrics(model_dir)] == [1, 2, 3]


def _train_tiny(gin_file, model_dir, lengths, *extra):
  """The train entry point's main, in this process (the subprocess around it
  is tested above). Lengths are short: a step's cost is mostly the output layer
  over the 8k vocabulary, per token."""
  from t5x_lite import train  # pylint: disable=g-import-not-at-top
  main_in_process(train, [
      f'--gin_file={gin_file}', f"--gin.MODEL_DIR='{model_dir}'", '--gin.TRAIN_STEPS=40',
      '--gin.WARMUP_STEPS=5', f'--gin.TASK_FEATURE_LENGTHS={lengths}', '--gin.BATCH_SIZE=16',
      '--gin.train_script.train.log_every=1', '--gin.train_script.train.progress_bar=False',
      *extra])
  return read_metrics(model_dir)


@pytest.mark.slow
def test_bert_tiny_trains_through_the_same_entry_point(tmp_path):
  rows = _train_tiny('gin/bert_tiny_mlm.gin', str(tmp_path), {'inputs': 64})
  assert {'mlm_loss', 'nsp_loss', 'mlm_accuracy', 'nsp_accuracy'} <= set(rows[-1])
  assert rows[-1]['tokens_per_second'] > 0
  assert rows[-1]['mlm_loss'] < 0.8 * rows[0]['mlm_loss']


@pytest.mark.slow
def test_gpt_tiny_trains_through_the_same_entry_point(tmp_path):
  rows = _train_tiny('gin/gpt_tiny_lm.gin', str(tmp_path), {'targets': 32})
  assert rows[-1]['tokens_per_second'] > 0
  assert rows[-1]['loss'] < 0.8 * rows[0]['loss']


@pytest.mark.slow
def test_bart_tiny_trains_through_the_same_entry_point(tmp_path):
  rows = _train_tiny('gin/bart_tiny_denoise.gin', str(tmp_path), {'inputs': 32, 'targets': 32},
                     '--gin.LEARNING_RATE=2e-3')
  assert rows[-1]['loss'] < 0.8 * rows[0]['loss']


# Checkpoint faults through the entry point (tests/test_checkpoints.py covers
# the Checkpointer alone). A fault that needs injecting, or one that stops the
# run before it trains, runs in this process; damaged files, which orbax reads
# on threads of its own, in a process of their own.

def _train_in_process(monkeypatch, capsys, model_dir, *extra):
  """`python -m t5x_lite.train` in this process: (exit status, stdout, stderr)."""
  from t5x_lite import gin_utils  # pylint: disable=g-import-not-at-top
  from t5x_lite import train as train_module  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, 'argv', ['train', *train_cmd(model_dir, *extra)[3:]])
  gin.clear_config(clear_constants=True)
  try:
    gin_utils.run(train_module.main, 'train')
    code = 0
  except SystemExit as e:
    code = e.code
  finally:
    gin.clear_config(clear_constants=True)
  out = capsys.readouterr()
  return code, out.out, out.err


def _no_noise(stderr):
  assert 'Traceback' not in stderr and 'Event loop is closed' not in stderr, stderr[-3000:]


def test_damaged_checkpoints_are_moved_aside_and_training_goes_past_them(tmp_path, uninterrupted):
  """On a copy of the uninterrupted run (checkpoints 40, 50 and 60): 60's arrays
  cut short and 50's metadata file deleted; one run moves both aside, resumes
  from 40 and trains past them."""
  model_dir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted, model_dir)
  ckpts = os.path.join(model_dir, 'checkpoints')
  for root, _, names in os.walk(os.path.join(ckpts, '60', 'state')):  # truncate the arrays
    for name in names if os.path.basename(root) == 'd' else ():
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)
  os.remove(os.path.join(ckpts, '50', 'state', '_METADATA'))  # a deleted metadata file
  proc = run_train(model_dir, '--gin.TRAIN_STEPS=70', '--gin.CHECKPOINT_PERIOD=10')
  aside = {d.split('.')[0]: os.path.join(ckpts, d) for d in os.listdir(ckpts) if '.damaged-' in d}
  assert sorted(aside) == ['50', '60'], aside
  [line] = [l for l in proc.stderr.splitlines() if f'{ckpts}/60 is damaged (' in l]
  assert f'checkpoint {ckpts}/60 is damaged ({ckpts}/60/state/' in line, line
  assert line.endswith(f" is cut short); moved it to {aside['60']} and trying the previous one."), \
      line
  assert (f'checkpoint {ckpts}/50 is damaged ({ckpts}/50/state/_METADATA is missing); moved '
          f"it to {aside['50']} and trying the previous one.") in proc.stderr
  assert f'resumed from {ckpts}/40 (data position 40, ' in proc.stdout
  _no_noise(proc.stderr)
  assert sorted(d for d in os.listdir(ckpts) if d.isdigit()) == ['50', '60', '70']  # keep 3
  assert [r['step'] for r in read_metrics(model_dir)] == list(range(1, 71))


def test_a_changed_model_config_is_one_line_and_touches_no_checkpoint(
    tmp_path, uninterrupted, monkeypatch, capsys):
  from test_checkpoints import digest_files  # pylint: disable=g-import-not-at-top
  model_dir = str(tmp_path / 'run')
  shutil.copytree(uninterrupted, model_dir)
  ckpts = os.path.join(model_dir, 'checkpoints')
  before = digest_files(model_dir)
  code, _, err = _train_in_process(monkeypatch, capsys, model_dir,
                                   f'--gin.TRAIN_STEPS={STEPS + 10}',
                                   '--gin.encoder_decoder.T5Config.num_encoder_layers=3')
  assert code == 2, err[-3000:]
  _no_noise(err)
  [line] = [l for l in err.splitlines() if 'error' in l.lower()]
  assert line.startswith(f'error: checkpoint {ckpts}/{STEPS} does not fit the configured model '
                         '(params/encoder/layers_2/')
  assert ': model (32, 32), checkpoint absent; ' in line
  assert line.endswith('the model config likely changed since it was written: run with the '
                       f'config it was written with ({model_dir}/config.gin), or give the run '
                       'a new MODEL_DIR.')
  assert digest_files(model_dir) == before


def test_a_failed_save_is_one_line_and_the_run_resumes_from_the_survivor(
    tmp_path, monkeypatch, capsys):
  """A full disk during the save of step 20 (injected: see fail_writes)."""
  from test_checkpoints import fail_writes  # pylint: disable=g-import-not-at-top
  model_dir = str(tmp_path)
  ckpts = os.path.join(model_dir, 'checkpoints')
  run = ['--gin.TRAIN_STEPS=20', '--gin.CHECKPOINT_PERIOD=10']
  with monkeypatch.context() as m:
    fail_writes(m, os.path.join(ckpts, '20.'), errno.ENOSPC)
    code, out, err = _train_in_process(m, capsys, model_dir, *run)
  assert code == 2 and 'done:' not in out
  _no_noise(err)
  [line] = [l for l in err.splitlines() if 'error' in l.lower()]
  assert line.startswith(f'error: writing checkpoint {ckpts}/20 failed (No space left on '
                         f'device: {ckpts}/20.')
  assert line.endswith(f'the earlier checkpoints are intact (latest: {ckpts}/10); free space '
                       f'or fix the permissions of {ckpts}, then re-run to resume.')
  assert [d for d in os.listdir(ckpts) if d.isdigit()] == ['10']
  code, out, err = _train_in_process(monkeypatch, capsys, model_dir, *run)  # once there is space
  assert code == 0, err[-3000:]
  assert f'resumed from {ckpts}/10 (data position 10, ' in out
  assert sorted(os.listdir(ckpts)) == ['10', '20']
  assert [r['step'] for r in read_metrics(model_dir)] == list(range(1, 21))


def test_an_unwritable_model_dir_is_one_line(tmp_path, monkeypatch, capsys):
  """chmod where that stops writes; as root, EACCES injected (see deny_writes)."""
  from test_checkpoints import deny_writes  # pylint: disable=g-import-not-at-top
  model_dir = tmp_path / 'run'
  model_dir.mkdir()
  try:
    with monkeypatch.context() as m:
      deny_writes(m, model_dir)
      code, _, err = _train_in_process(m, capsys, str(model_dir), '--gin.TRAIN_STEPS=2')
  finally:
    os.chmod(model_dir, 0o755)
  assert code == 2
  assert err.strip().splitlines()[-1] == (
      f'error: cannot write checkpoints to {model_dir}/checkpoints (Permission denied: '
      f'{model_dir}/checkpoints); fix the permissions or free space there, or choose another '
      'MODEL_DIR.')


def test_eval_lines_are_the_evaluation_table_under_the_step():
  from t5x_lite import train  # pylint: disable=g-import-not-at-top
  assert train.eval_lines(3, {'eval/hh_rlhf/loss': 0.6931, 'eval/hh_rlhf/reward_accuracy': 0.5}) \
      == 'eval at step 3: hh_rlhf  loss 0.69, reward_accuracy 0.50'
  flat = {'eval/glue_cola_v002/matthews_corrcoef': 12.3, 'eval/glue_sst2_v002/accuracy': 90.0,
          'eval/glue_average': 51.17}
  assert train.eval_lines(500, flat) == '\n'.join([
      'eval at step 500:',
      '  glue_cola_v002  matthews_corrcoef 12.30',
      '  glue_sst2_v002  accuracy 90.00',
      '  glue_average    51.17'])
