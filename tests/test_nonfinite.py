"""Non-finite steps are skipped and never reach the state or a checkpoint;
too many in a row stop the run; an evaluation error costs no training."""

import glob
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5x_lite import optimizers
from t5x_lite import runs
from t5x_lite import train as train_lib
from t5x_lite import trainer as trainer_lib
from t5x_lite.errors import UserError
from t5x_lite.models import decoder
from t5x_lite.partitioning import Partitioner

import families
from conftest import REPO, run_env

POISON = 7  # a batch whose first target is this id gets a NaN loss


class _Poisoned(decoder.DecoderModel):

  def loss_fn(self, params, batch, dropout_rng, **kwargs):
    loss, metrics = super().loss_fn(params, batch, dropout_rng, **kwargs)
    loss = loss + jnp.where(batch['decoder_target_tokens'][0, 0] == POISON, jnp.nan, 0.0)
    return loss, dict(metrics, loss=loss)


def _trainer(model, batch, learning_rate):
  shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
  return trainer_lib.Trainer(model, optimizers.adamw(learning_rate), Partitioner(), shapes)


def test_a_nan_loss_leaves_params_and_optimizer_state_unchanged():
  model = _Poisoned(families.tiny('gpt').config)
  good = families.random_batch(model, rows=4)
  good['decoder_target_tokens'][0, 0] = POISON + 1
  bad = {k: v.copy() for k, v in good.items()}
  bad['decoder_target_tokens'][0, 0] = POISON
  trainer = _trainer(model, good, 1e-3)
  state, metrics = trainer.train_step(trainer.init_state(0), good)
  assert float(metrics['nonfinite_steps']) == 0
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = trainer.train_step(state, bad)
  assert float(metrics['nonfinite_steps']) == 1 and math.isnan(float(metrics['loss']))
  after = jax.device_get((state.params, state.opt_state))
  jax.tree_util.tree_map(np.testing.assert_array_equal, after, before)
  assert int(state.step) == 2  # the batch is consumed
  state, metrics = trainer.train_step(state, good)
  assert float(metrics['nonfinite_steps']) == 0 and math.isfinite(float(metrics['loss']))
  changed = jax.device_get(state.params)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(changed),
                                                       jax.tree_util.tree_leaves(before[0])))


def test_a_huge_learning_rate_never_puts_a_nan_or_inf_in_the_params():
  model = families.tiny('gpt')
  batch = families.random_batch(model, rows=4)
  trainer = _trainer(model, batch, 1e30)
  state = trainer.init_state(0)
  skipped = []
  for _ in range(6):
    state, metrics = trainer.train_step(state, batch)
    skipped.append(float(metrics['nonfinite_steps']))
    assert bool(trainer_lib.all_finite(state.params)) and bool(trainer_lib.all_finite(
        state.opt_state))
  assert skipped[0] == 0 and skipped[-1] == 1  # the first update diverges, then none apply


def test_counts_sum_over_a_logging_interval():
  history = [{'loss': jnp.float32(x), 'nonfinite_steps': jnp.float32(x > 1)} for x in (1, 2, 3)]
  assert trainer_lib.mean_metrics(history) == {'loss': 2.0, 'nonfinite_steps': 2.0}


def _checkpointed_params(model_dir):
  """Every checkpoint's arrays, read back with orbax."""
  out = {}
  for path in sorted(glob.glob(os.path.join(model_dir, 'checkpoints', '[0-9]*'))):
    state = os.path.join(path, 'state')
    out[int(os.path.basename(path))] = ocp.PyTreeCheckpointer().restore(state)
  return out


def test_lr_1e30_stops_with_one_line_and_every_checkpoint_is_finite(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, '-m', 't5x_lite.train', '--gin_file=gin/gpt_tiny_lm.gin',
         f"--gin.MODEL_DIR='{tmp_path}'", '--gin.TRAIN_STEPS=200', '--gin.CHECKPOINT_PERIOD=5',
         '--gin.LEARNING_RATE=1e30', '--gin.BATCH_SIZE=4', "--gin.TASK_FEATURE_LENGTHS={'targets': 32}",
         '--gin.decoder.GPTConfig.num_layers=1', '--gin.train_script.train.progress_bar=False']
  proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = proc.stderr.strip().splitlines()[-1]
  match = re.fullmatch(r'error: the loss became non-finite at step (\d+) and all (\d+) updates '
                       r'since were skipped; the last checkpoint, (.+)/checkpoints/(\d+), holds '
                       r'the params from before step \1; lower LEARNING_RATE or check the data, '
                       r'then re-run\.', line)
  assert match, line
  first, skipped, model_dir, last = match.groups()
  # Checked at the next sync point (every CHECKPOINT_PERIOD = 5 steps here).
  assert 10 <= int(skipped) < 15 and model_dir == str(tmp_path)
  saved = _checkpointed_params(str(tmp_path))
  stop = int(first) + int(skipped) - 1  # the run stops before that step's save
  assert max(saved) == int(last) == (stop - 1) // 5 * 5
  for step, state in saved.items():
    for leaf in jax.tree_util.tree_leaves(state):
      if np.issubdtype(np.asarray(leaf).dtype, np.floating):
        assert np.all(np.isfinite(leaf)), step


@pytest.mark.parametrize('on_error', ['continue', 'stop'])
def test_an_evaluation_error_costs_no_training(tmp_path, monkeypatch, capsys, on_error):
  import t5x_lite.tasks  # pylint: disable=g-import-not-at-top,unused-import

  def broken(self, state, batch):
    raise RuntimeError('the metric crashed\nsecond line')

  monkeypatch.setattr(trainer_lib.Trainer, 'eval_metrics', broken)
  config = runs.TrainConfig(families.tiny('gpt', vocab_size=8192), optimizers.adamw(1e-3),
                            runs.Data('embedded_lm', {'targets': 16}, batch_size=2))
  args = dict(config=config, train_steps=4, model_dir=str(tmp_path),
              checkpoint=train_lib.CheckpointConfig(3, async_save=False),
              evaluation=train_lib.EvalConfig(2, split='train', mode='loss', num_examples=2,
                                                 on_error=on_error), log_every=1,
              progress_bar=False)
  want = 'evaluating embedded_lm at step 2 failed: RuntimeError: the metric crashed'
  if on_error == 'stop':
    with pytest.raises(UserError, match=want + '; the checkpoint of step 2 is saved.$'):
      train_lib.train(**args)
    assert sorted(_checkpointed_params(str(tmp_path))) == [2]
  else:
    result = train_lib.train(**args)
    assert math.isfinite(result['loss'])
    assert f'warning: {want}; training continues' in capsys.readouterr().out
    assert sorted(_checkpointed_params(str(tmp_path))) == [2, 3, 4]  # evaluated steps too
  with pytest.raises(UserError, match="on_error='later' is unknown"):
    train_lib.EvalConfig(on_error='later')
