"""Ahead-of-time compilation of the train step for TPU slices, on this CPU host.

The shipped gins compile for their slices with tiny model sizes bound on the
command line (one or two layers, embedding 64, vocabulary 512, batch 32-64,
length 32), as a user would bind any gin value; the full sizes compile the same
way but take minutes.
"""

import importlib.util
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, run_env
from t5x_lite import host
from t5x_lite import precompile

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                       reason='libtpu is not installed (pip install -e .[tpu])'),
    pytest.mark.slow,
]

GiB = 2**30
_TINY_BERT = ('encoder.BertConfig.num_layers=1', 'encoder.BertConfig.emb_dim=64',
              'encoder.BertConfig.num_heads=2', 'encoder.BertConfig.head_dim=32',
              'encoder.BertConfig.mlp_dim=128', 'encoder.BertConfig.vocab_size=512',
              'BATCH_SIZE=64', "TASK_FEATURE_LENGTHS={'inputs': 32}")
_TINY_T5 = ('encoder_decoder.T5Config.num_encoder_layers=1',
            'encoder_decoder.T5Config.num_decoder_layers=1', 'encoder_decoder.T5Config.emb_dim=64',
            'encoder_decoder.T5Config.num_heads=2', 'encoder_decoder.T5Config.head_dim=32',
            'encoder_decoder.T5Config.mlp_dim=128', 'encoder_decoder.T5Config.vocab_size=512',
            'BATCH_SIZE=32', "TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}")
_TINY_GPT = ('decoder.GPTConfig.num_layers=1', 'decoder.GPTConfig.emb_dim=64',
             'decoder.GPTConfig.num_heads=2', 'decoder.GPTConfig.head_dim=32',
             'decoder.GPTConfig.mlp_dim=128', 'decoder.GPTConfig.vocab_size=512',
             'BATCH_SIZE=64', "TASK_FEATURE_LENGTHS={'targets': 32}")  # 4 microbatches of 16
CASES = {
    'bert_base v3:4x4': ('gin/bert_base_mlm.gin', 'v3:4x4', _TINY_BERT),
    'bert_large v3:8x8': ('gin/bert_large_mlm.gin', 'v3:8x8', _TINY_BERT + ('BATCH_SIZE=256',)),
    't5_base v3:4x4': ('gin/t5_base_span.gin', 'v3:4x4', _TINY_T5),
    't5_base v4:2x2x2': ('gin/t5_base_span.gin', 'v4:2x2x2', _TINY_T5),
    'gpt2_small v5e:4x4': ('gin/gpt2_small_lm.gin', 'v5e:4x4', _TINY_GPT),
    # An RL iteration: rollout, scoring and update phases (memory: the largest).
    'gpt_grpo v5e:2x2': ('gin/gpt_grpo.gin', 'v5e:2x2', ('decoder.GPTConfig.num_layers=1',)),
}

# Compiles every case in one process; prints one JSON line of figures per case.
_SCRIPT = '''
import dataclasses, json, sys, gin
from t5x_lite import gin_utils, precompile
for name, (gin_file, topology, bindings) in json.loads(sys.argv[1]).items():
  gin.clear_config()
  gin_utils.parse_gin([gin_file], [b.replace('=', ' = ', 1) for b in bindings])
  tpu = precompile.tpu_slice(topology)
  report = gin.get_configurable(precompile.precompile)(topology)
  print(json.dumps(dict(dataclasses.asdict(report), name=name, devices=len(tpu.devices),
                        kinds=sorted({d.device_kind for d in tpu.devices}),
                        peak_per_device=tpu.peak_flops_per_device)))
'''


# make test runs this module on one xdist worker (conftest.ONE_WORKER_MODULES):
# the cases compile once.
@pytest.fixture(scope='module')
def compiled():
  proc = subprocess.run([sys.executable, '-c', _SCRIPT, json.dumps(CASES)], cwd=REPO,
                        env=run_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def reports(compiled):
  rows = [json.loads(line) for line in compiled.stdout.splitlines() if line.startswith('{')]
  return {row['name']: row for row in rows}


def test_says_what_it_compiles_and_how_long_it_took(compiled, reports):
  """Off a terminal, a line on stderr before each compile and one after it."""
  lines = [l for l in compiled.stderr.splitlines() if l.startswith('compil')]
  expected = []
  for name, (_, topology, _) in CASES.items():
    what = f"the train step for {topology} (mesh {reports[name]['mesh']})"
    expected += [f'compiling {what} ...', f'compiled {what} in ']
  assert len(lines) == len(expected), compiled.stderr[-3000:]
  for line, start in zip(lines, expected):
    assert line.startswith(start), (line, start)
  seconds = [float(l.rsplit(' in ', 1)[1].rstrip('s')) for l in lines[1::2]]
  assert all(s > 0 for s in seconds), seconds


@pytest.mark.parametrize('name, devices, kind, hbm_gib, peak', [
    ('bert_base v3:4x4', 32, 'TPU v3', 16, 123e12 / 2),      # 2 cores per v3 chip
    ('bert_large v3:8x8', 128, 'TPU v3', 16, 123e12 / 2),
    ('t5_base v3:4x4', 32, 'TPU v3', 16, 123e12 / 2),
    ('t5_base v4:2x2x2', 8, 'TPU v4', 32, 275e12),           # one megacore device per chip
    ('gpt2_small v5e:4x4', 16, 'TPU v5 lite', 16, 197e12),
    ('gpt_grpo v5e:2x2', 4, 'TPU v5 lite', 16, 197e12),
])
def test_compiles_for_the_slice(reports, name, devices, kind, hbm_gib, peak):
  r = reports[name]
  assert (r['devices'], r['kinds'], r['hbm_bytes'], r['peak_per_device']) == (
      devices, [kind], hbm_gib * GiB, peak)
  assert r['argument_bytes'] > 0 and r['output_bytes'] > 0 and r['temp_bytes'] >= 0
  assert r['argument_bytes'] + r['temp_bytes'] <= r['total_bytes'] <= (
      r['argument_bytes'] + r['output_bytes'] + r['temp_bytes'] + 2**26)
  assert r['step_seconds'] == r['flops'] / peak
  assert r['flops'] > 0 and r['total_bytes'] < r['hbm_bytes']
  assert r['kernels'] == 'plain'  # 'auto' resolves for the TPU compiled for, not this CPU host


def test_step_is_the_gins_train_step(reports):
  """Same model and batch per device on 32 and 128 devices: same per-device memory
  and FLOPs; the state (the arguments) is replicated, as the gin's data-parallel
  rules say, so the donated outputs repeat it."""
  base, large = reports['bert_base v3:4x4'], reports['bert_large v3:8x8']
  assert base['argument_bytes'] == large['argument_bytes']
  assert base['flops'] == large['flops']
  assert base['train_steps'] == large['train_steps'] == 1_000_000
  assert reports['gpt2_small v5e:4x4']['train_steps'] == 600_000
  for r in reports.values():
    assert r['output_bytes'] >= r['argument_bytes'] - r['argument_bytes'] // 8


def test_does_not_fit_exits_with_one_line():
  cmd = [sys.executable, '-m', 't5x_lite.precompile', '--gin_file=gin/gpt2_small_lm.gin',
         '--topology=v5e:2x2', *[f'--gin.{b}' for b in _TINY_GPT],
         '--gin.decoder.GPTConfig.vocab_size=262144', '--gin.BATCH_SIZE=4096',
         "--gin.TASK_FEATURE_LENGTHS={'targets': 1024}"]
  proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: does not fit: ')
  assert ' GiB needed per device, 16.00 GiB available; ' in last
  assert 'TPU_' not in proc.stderr and 'libtpu' not in proc.stderr, proc.stderr  # quiet start


def test_unknown_topology_and_missing_libtpu(monkeypatch):
  from t5x_lite import precompile  # pylint: disable=g-import-not-at-top
  from t5x_lite.errors import UserError  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="unknown topology 'v9:4x4'"):
    precompile.tpu_slice('v9:4x4')
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(UserError, match=r'pip install -e \.\[tpu\]'):
    precompile.tpu_slice('v3:4x4')


@pytest.mark.skipif(host.host_has_accelerator(), reason='this host has an accelerator')
def test_cpu_host_starts_quietly_with_libtpu_installed():
  env = {k: v for k, v in run_env().items()
         if k not in ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL', 'ALLOW_MULTIPLE_LIBTPU_LOAD')}
  code = ('import jax; from t5x_lite import host; host.prepare(tensorflow=False); '
          'print([d.platform for d in jax.devices()])')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == "['cpu']"
  assert 'TPU' not in proc.stderr and 'libtpu' not in proc.stderr, proc.stderr


def test_scanned_matmuls_count_once_per_iteration():
  """XLA counts a loop body once; precompile's factor counts every scan iteration."""
  w = np.ones((3, 4, 4), np.float32)

  def step(x):
    return jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0] @ w[0]

  jaxpr = jax.make_jaxpr(step)(np.ones((2, 4), np.float32)).jaxpr
  one = 2 * 2 * 4 * 4  # one [2, 4] x [4, 4] product
  assert precompile._dot_flops(jaxpr, repeat_scans=False) == 2 * one
  assert precompile._dot_flops(jaxpr, repeat_scans=True) == 4 * one
