"""Several hosts: each reads its own shard of the data; the launcher of two
real JAX processes of one run (trained and preempted in
test_preemption_multihost.py)."""

import functools
import socket
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import seqio

from conftest import REPO, run_env
from t5x_lite import distributed
from t5x_lite.data import pipeline
from t5x_lite.data import sources
from t5x_lite.data import vocab
from t5x_lite.errors import UserError


@pytest.fixture(scope='module')
def lines_task(tmp_path_factory):
  """A deterministic task: 37 one-line documents, tokenized, nothing random."""
  path = tmp_path_factory.mktemp('docs') / 'docs.txt'
  path.write_text(''.join(f'document number {i} says {i * i}\n' for i in range(37)))
  name = 'multihost_lines'
  seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=sources.text_file_source({'train': str(path)}),
      preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={'targets': 'text'}),
                     seqio.preprocessors.tokenize],
      output_features={'targets': seqio.Feature(vocab.embedded_vocabulary(), add_eos=False)})
  return name


def _rows(task, shard_id, num_shards):
  ds = pipeline.get_dataset(task, {'targets': 16}, batch_size=num_shards, shuffle=False,
                            num_epochs=1, pack=False, shard_id=shard_id, num_shards=num_shards,
                            feature_converter_cls=seqio.DecoderFeatureConverter)
  return [tuple(row) for batch in ds.as_numpy_iterator()
          for row in batch['decoder_target_tokens']]


@pytest.mark.parametrize('num_hosts', [2, 4])
def test_hosts_read_disjoint_shards_that_cover_the_data(lines_task, num_hosts):
  everything = _rows(lines_task, 0, 1)
  assert len(everything) == len(set(everything)) == 37
  shards = [_rows(lines_task, i, num_hosts) for i in range(num_hosts)]
  seen = [row for shard in shards for row in shard]
  assert len(seen) == len(set(seen))  # disjoint
  # Each host yields batch_size / num_hosts = 1 row per step, so nothing is dropped.
  assert sorted(seen) == sorted(everything)
  assert {len(s) for s in shards} <= {37 // num_hosts, 37 // num_hosts + 1}


def test_batch_not_divisible_by_hosts_is_one_line(lines_task):
  with pytest.raises(UserError, match='not divisible by the 3 hosts'):
    pipeline.get_dataset(lines_task, {'targets': 16}, batch_size=8, shard_id=0, num_shards=3,
                         feature_converter_cls=seqio.DecoderFeatureConverter)


def test_multihost_environment_detection(monkeypatch):
  for name in ('TPU_WORKER_HOSTNAMES', 'JAX_COORDINATOR_ADDRESS', 'SLURM_NTASKS'):
    monkeypatch.delenv(name, raising=False)
  assert distributed.multihost_environment() is None
  assert distributed.initialize('auto') is False and distributed.initialize('off') is False
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'localhost')  # a single-host TPU VM
  assert distributed.multihost_environment() is None
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 't1v-n-0,t1v-n-1,t1v-n-2,t1v-n-3')
  assert distributed.multihost_environment() == 'Cloud TPU VM slice of 4 hosts'
  with pytest.raises(UserError, match='--distributed=maybe is not one of auto, on, off'):
    distributed.initialize('maybe')


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _expected_losses(flags, steps, num_hosts):
  """The run's losses, computed in this process from the hosts' shards side by side."""
  from t5x_lite import gin_utils  # pylint: disable=g-import-not-at-top
  from t5x_lite import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  from t5x_lite.partitioning import Partitioner  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  files, bindings = gin_utils.parse_flags(flags)
  gin_utils.parse_gin(files, bindings)
  build = lambda name: gin.query_parameter(f'runs.TrainConfig.{name}').scoped_configurable_fn()
  model, optimizer = build('model'), build('optimizer')
  name, lengths, batch_size = (gin.query_parameter(f'{m}/gin.macro.value') for m in
                               ('MIXTURE_OR_TASK_NAME', 'TASK_FEATURE_LENGTHS', 'BATCH_SIZE'))
  gin.clear_config()
  hosts = [pipeline.get_dataset(name, lengths, batch_size, seed=0, shard_id=i, num_shards=num_hosts,
                                feature_converter_cls=model.FEATURE_CONVERTER_CLS).as_numpy_iterator()
           for i in range(num_hosts)]
  batches = [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
             for parts in zip(*[[next(h) for _ in range(steps)] for h in hosts])]
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
  trainer = trainer_lib.Trainer(model, optimizer, Partitioner(), shapes)
  state, losses = trainer.init_state(0), []
  for batch in batches:
    state, metrics = trainer.train_step(state, batch)
    losses.append(float(metrics['loss']))
  return losses


def launch_two_hosts(flags, model_dir):
  """`python -m t5x_lite.train` as two processes of one run (one device each)."""
  port = _free_port()
  cmd = [sys.executable, '-m', 't5x_lite.train', *flags, f"--gin.MODEL_DIR='{model_dir}'"]
  procs = []
  for i in range(2):
    env = dict(run_env(devices=1), JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
               JAX_NUM_PROCESSES='2', JAX_PROCESS_ID=str(i))
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs
