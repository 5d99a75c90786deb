"""Precomputes DPO's reference log-probs, so training keeps one model on the devices.

    python -m t5x_lite.precompute_reference --gin_file=gin/gpt_dpo.gin \\
        --gin.REFERENCE_LOGPS_PATH="'runs/gpt_dpo/reference_logps.npz'"

The reference model is what training would start from: the params of
INITIAL_CHECKPOINT_PATH, or the random init of SEED. Every pair of the task's
(or each mixture task's) 'train' and 'validation' splits is scored once, in
order, and `REFERENCE_LOGPS_PATH` gets an .npz of `pair_key` (the task's
int64 fingerprint of the pair), `chosen` and `rejected` (float32 sequence
log-probs). Training with the same gin files and that path reads them into
each batch instead of running the reference model.
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import dataclasses
import io
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
import tensorflow as tf

from t5x_lite import gin_utils
from t5x_lite import runs
from t5x_lite.data import pipeline
from t5x_lite.errors import UserError
from t5x_lite.models import preference


def _pad(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
  """`batch` with copies of its row 0 appended up to `size` rows."""
  short = size - len(next(iter(batch.values())))
  return {k: np.concatenate([v, np.repeat(v[:1], short, axis=0)]) for k, v in batch.items()}


def precompute(*,
               config: runs.TrainConfig,
               output_path: Optional[str],
               splits: Sequence[str] = ('train', 'validation')) -> dict[str, np.ndarray]:
  """Writes and returns {'pair_key', 'chosen', 'rejected'}; see the module doc."""
  model = config.model
  if not isinstance(model, preference.DPOModel):
    raise UserError('precompute_reference needs a DPO run: include configs/runs/dpo.gin '
                    '(e.g. gin/gpt_dpo.gin).')
  if not output_path:
    raise UserError('set REFERENCE_LOGPS_PATH to the file the reference log-probs go to.')
  if jax.process_count() > 1:
    raise UserError('run precompute_reference in a single process (one host); the file it '
                    'writes serves every host of the training run.')
  data = dataclasses.replace(config.data, split=None)
  converter = model.converter_cls(with_reference=False, keep_pair_key=True)
  run = runs.Run(model, data, config.partitioner(), converter=converter)
  partitioner, batch_size = run.partitioner, data.batch_size
  task = run.task
  subtasks = [task] if isinstance(task, seqio.Task) else seqio.get_subtasks(task)
  datasets = [pipeline.get_dataset(t.name, data.task_feature_lengths, batch_size, split=split,
                                   shuffle=False, seed=None, pack=False, num_epochs=1,
                                   vocabulary=data.vocabulary, feature_converter_cls=converter,
                                   drop_remainder=False)
              for t in subtasks for split in splits if split in t.splits]
  if not datasets:
    raise UserError(f"'{data.mixture_or_task_name}' has none of the splits {list(splits)}.")
  spec = {k: v for k, v in datasets[0].element_spec.items() if k != 'pair_key'}
  batch_shapes = {k: jax.ShapeDtypeStruct((batch_size,) + tuple(v.shape[1:]),
                                          v.dtype.as_numpy_dtype) for k, v in spec.items()}
  trainer = run.trainer(optax.identity(), batch_shapes=batch_shapes)
  params = trainer.initial_state(data.seed or 0, config.initial_checkpoint_path,
                                 model.FRESH_PARAMS).params

  def score(params, batch):
    return jnp.stack(jnp.split(model.sequence_logps(params, preference.pair_batch(batch)), 2))

  with partitioner.activate():
    score = jax.jit(score, in_shardings=(trainer.param_shardings, trainer.batch_sharding),
                    out_shardings=partitioner.replicated)
  keys, values = [], []
  for ds in datasets:
    for batch in ds.as_numpy_iterator():
      n = len(batch['pair_key'])
      keys.append(batch.pop('pair_key'))
      with partitioner.activate():
        values.append(np.asarray(score(params, partitioner.shard_batch(_pad(batch, batch_size))))[:, :n])
  keys, values = np.concatenate(keys), np.concatenate(values, axis=1)
  out = {'pair_key': keys.astype(np.int64), 'chosen': values[0], 'rejected': values[1]}
  directory = os.path.dirname(os.path.abspath(output_path))
  tf.io.gfile.makedirs(directory)
  buffer = io.BytesIO()
  np.savez(buffer, **out)
  tmp = output_path + '.tmp'
  with tf.io.gfile.GFile(tmp, 'wb') as f:
    f.write(buffer.getvalue())
  tf.io.gfile.rename(tmp, output_path, overwrite=True)
  print(f'wrote the reference log-probs of {len(keys):,} pairs ({len(np.unique(keys)):,} '
        f'distinct) to {output_path}')
  return out


def main(argv: Sequence[str]) -> None:
  import t5x_lite.tasks  # pylint: disable=g-import-not-at-top,unused-import  (the built-in tasks)
  gin_utils.call_configured(precompute, argv)


if __name__ == '__main__':
  import t5x_lite.precompute_reference as module  # pylint: disable=g-import-not-at-top
  gin_utils.run(module.main, 'precompute_reference')
