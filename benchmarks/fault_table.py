"""The fault table: inject each fault into a real `python -m t5x_lite.train`
run of a very small T5 (or the tiny GPT), and print what the user sees.

    python benchmarks/fault_table.py [--work_dir=/tmp/faults] [--only=NAME,...]

Each row: the fault, how it was injected, the last line the user sees, the
exit code, whether a re-run continued past the fault, and the steps lost (the
steps trained again after the re-run, against an undisturbed run). A full disk
needs a small tmpfs (`mount`, so root on Linux); that row is skipped elsewhere.
Runs take a few minutes on 2 CPU cores.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_T5 = [
    '--gin_file=gin/t5_tiny_span.gin',
    '--gin.encoder_decoder.T5Config.emb_dim=32',
    '--gin.encoder_decoder.T5Config.num_heads=2',
    '--gin.encoder_decoder.T5Config.head_dim=16',
    '--gin.encoder_decoder.T5Config.mlp_dim=64',
    '--gin.encoder_decoder.T5Config.num_encoder_layers=2',
    '--gin.encoder_decoder.T5Config.num_decoder_layers=2',
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 16}",
    '--gin.BATCH_SIZE=8',
    '--gin.train_script.train.progress_bar=False',
    '--gin.train_script.train.log_every=1',
    '--gin.CHECKPOINT_PERIOD=10',
]


def _env():
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join('/tmp', 't5x_lite_fault_cache'))
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  return env


def _cmd(model_dir, *extra, base=SMALL_T5):
  return [sys.executable, '-m', 't5x_lite.train', *base, f"--gin.MODEL_DIR='{model_dir}'",
          *extra]


def train(model_dir, *extra, base=SMALL_T5):
  """(exit code, last line of stdout + stderr, the run's output)."""
  proc = subprocess.run(_cmd(model_dir, *extra, base=base), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=900)
  out = proc.stdout + proc.stderr
  lines = [l for l in out.splitlines() if l.strip()]
  return proc.returncode, (lines or [''])[-1], out


def _error_or_warning(out):
  """The run's `error:` line, else its first warning about checkpoints."""
  for prefix in ('error:', 'warning:', 'WARNING'):
    for line in out.splitlines():
      if line.startswith(prefix):
        return line
  return ''


def trained_steps(model_dir):
  """The steps a run's metrics.jsonl logged, in order (a re-run appends)."""
  path = os.path.join(model_dir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l)['step'] for l in f if l.strip() and '"loss"' in l]


def checkpoint_steps(model_dir):
  root = os.path.join(model_dir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []


def _lost(reached, out):
  """Steps trained again: the last step logged before the fault (`reached`)
  less the step the re-run resumed from (0 for a fresh start)."""
  resumed = re.search(r'resumed from \S+/(\d+)', out)
  return reached - (int(resumed[1]) if resumed else 0)


def _reached(model_dir):
  return max(trained_steps(model_dir), default=0)


def _row(fault, how, line, code, continued, lost):
  return {'fault': fault, 'how': how, 'line': line, 'exit': code, 'continued': continued,
          'steps_lost': lost}


def _damage(fault, how, wd, harm):
  d = os.path.join(wd, fault.replace(' ', '_'))
  train(d, '--gin.TRAIN_STEPS=20')
  harm(os.path.join(d, 'checkpoints', '20'))
  reached = _reached(d)
  code, _, out = train(d, '--gin.TRAIN_STEPS=30')
  return _row(fault, how, _error_or_warning(out), code, code == 0 and 30 in checkpoint_steps(d),
              _lost(reached, out))


def truncated(wd):
  def harm(step_dir):
    for root, _, names in os.walk(step_dir):
      for n in names:
        p = os.path.join(root, n)
        if os.path.getsize(p) > 0 and not n.startswith('_'):
          with open(p, 'r+b') as f:
            f.truncate(os.path.getsize(p) // 2)
  return _damage('truncated array files', 'halve every array file of checkpoints/20', wd, harm)


def deleted_metadata(wd):
  def harm(step_dir):
    for root, _, names in os.walk(step_dir):
      for n in names:
        if n == '_METADATA':
          os.remove(os.path.join(root, n))
  return _damage('deleted metadata', 'delete every _METADATA of checkpoints/20', wd, harm)


def sigkill_during_save(wd):
  d = os.path.join(wd, 'sigkill')
  proc = subprocess.Popen(_cmd(d, '--gin.TRAIN_STEPS=40'), cwd=REPO, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  root = os.path.join(d, 'checkpoints')
  while proc.poll() is None:
    names = os.listdir(root) if os.path.isdir(root) else []
    if any(n.startswith('20') for n in names):  # step 20's save has begun
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.005)
  proc.wait()
  at_kill, reached = checkpoint_steps(d), _reached(d)
  code, _, out = train(d, '--gin.TRAIN_STEPS=40')
  resumed = [l for l in out.splitlines() if 'resum' in l.lower() or 'restor' in l.lower()]
  return _row('SIGKILL during a save', f'kill -9 as checkpoints/20 appears (then: {at_kill})',
              (resumed or [_error_or_warning(out)])[0], code,
              code == 0 and 40 in checkpoint_steps(d), _lost(reached, out))


def config_change(wd):
  d = os.path.join(wd, 'config_change')
  train(d, '--gin.TRAIN_STEPS=10')
  before = sorted(os.listdir(os.path.join(d, 'checkpoints')))
  code, line, _ = train(d, '--gin.TRAIN_STEPS=20',
                        '--gin.encoder_decoder.T5Config.num_encoder_layers=3')
  kept = sorted(os.listdir(os.path.join(d, 'checkpoints'))) == before
  return _row('model config change', 're-run with num_encoder_layers=3', line, code,
              f'no (checkpoints untouched: {kept})', 0)


def unwritable(wd):
  del wd
  code, line, _ = train('/sys/t5x_lite_run', '--gin.TRAIN_STEPS=10')
  return _row('unwritable MODEL_DIR', "MODEL_DIR='/sys/t5x_lite_run' (read-only sysfs)", line,
              code, 'no', 0)


def full_disk(wd):
  probe = os.path.join(wd, 'size_probe')
  train(probe, '--gin.TRAIN_STEPS=10')
  size = sum(os.path.getsize(os.path.join(r, n))
             for r, _, ns in os.walk(os.path.join(probe, 'checkpoints', '10')) for n in ns)
  mount = os.path.join(wd, 'small_fs')
  os.makedirs(mount, exist_ok=True)
  mb = max(1, int(1.6 * size / 2**20) + 1)
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={mb}m', 'tmpfs', mount]).returncode:
    return _row('full disk during a save', 'needs mount (root)', 'skipped', '', '', '')
  try:
    d = os.path.join(mount, 'run')
    code, line, _ = train(d, '--gin.TRAIN_STEPS=30')
    left, reached = checkpoint_steps(d), _reached(d)
    shutil.copytree(d, os.path.join(wd, 'full_disk_copy'))
  finally:
    subprocess.run(['umount', mount])
  d = os.path.join(wd, 'full_disk_copy')
  code2, _, out = train(d, '--gin.TRAIN_STEPS=30')  # resumed on a disk with room
  return _row('full disk during a save',
              f'tmpfs of {mb} MiB (one checkpoint is {size / 2**20:.1f} MiB); left: {left}',
              line, code, f're-run with room: exit {code2}, reaches 30: '
              f'{30 in checkpoint_steps(d)}', _lost(reached, out))


def _gin_error(fault, how, *flags):
  code, line, _ = train(os.path.join('/tmp', 'unused'), *flags)
  return _row(fault, how, line, code, 'no (nothing trained)', 0)


def misspelt_macro(wd):
  del wd
  return _gin_error('misspelt macro', '--gin.TRAIN_STEPZ=5', '--gin.TRAIN_STEPZ=5')


def misspelt_parameter(wd):
  del wd
  return _gin_error('misspelt parameter', '--gin.encoder_decoder.T5Config.emb_dmi=64',
                    '--gin.encoder_decoder.T5Config.emb_dmi=64')


def huge_lr(wd):
  d = os.path.join(wd, 'lr1e30')
  code, line, _ = train(d, '--gin.TRAIN_STEPS=200', '--gin.CHECKPOINT_PERIOD=5',
                        '--gin.LEARNING_RATE=1e30', '--gin.train_script.train.progress_bar=False',
                        base=['--gin_file=gin/gpt_tiny_lm.gin'])
  return _row('lr 1e30 (GPT tiny, AdamW)', '--gin.LEARNING_RATE=1e30, 200 steps', line, code,
              f'stopped; checkpoints left {checkpoint_steps(d)}', '')


FAULTS = dict(sigkill=sigkill_during_save, truncated=truncated, metadata=deleted_metadata,
              config=config_change, unwritable=unwritable, full_disk=full_disk,
              lr=huge_lr, macro=misspelt_macro, parameter=misspelt_parameter)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--work_dir', default='/tmp/t5x_lite_faults')
  parser.add_argument('--only', default='', help='comma-separated: ' + ','.join(FAULTS))
  args = parser.parse_args()
  shutil.rmtree(args.work_dir, ignore_errors=True)
  os.makedirs(args.work_dir)
  names = args.only.split(',') if args.only else list(FAULTS)
  print('| fault | injected | what the user sees | exit | continued | steps lost |')
  print('|---|---|---|---|---|---|')
  for name in names:
    start = time.time()
    r = FAULTS[name](args.work_dir)
    print(f"| {r['fault']} | {r['how']} | `{r['line']}` | {r['exit']} | {r['continued']} | "
          f"{r['steps_lost']} |  <!-- {time.time() - start:.0f} s -->", flush=True)


if __name__ == '__main__':
  main()
