"""From a registered seqio task (or mixture) to this host's stream of batches.

source → task preprocessors → feature converter → batches of this host's share
of the global batch, deterministic for a seed, resumable at a batch position.
"""

import dataclasses
from typing import Mapping, Optional

import jax
import numpy as np
import seqio
import tensorflow as tf

from t5x_lite.data import registry
from t5x_lite.errors import UserError


# The registry lookups, under the names the entry points call them by.
get_task_or_mixture = registry.get_task_or_mixture
check_data_available = registry.check_data_available


def with_vocabulary(task: seqio.Task | seqio.Mixture,
                    vocabulary: Optional[seqio.Vocabulary]) -> seqio.Task:
  """The task with every output feature's vocabulary replaced by `vocabulary`."""
  if vocabulary is None:
    return task
  if not isinstance(task, seqio.Task):
    raise UserError(f"a vocabulary override applies to a task, but '{task.name}' is a mixture; "
                    'register the mixture over tasks built with your vocabulary instead.')
  features = {k: dataclasses.replace(f, vocabulary=vocabulary) if f.dtype == tf.int32 else f
              for k, f in task.output_features.items()}  # token features only
  return task.replace(output_features=features)


def output_vocab_size(task: seqio.Task | seqio.Mixture,
                      vocabulary: Optional[seqio.Vocabulary] = None) -> int:
  if vocabulary is not None:
    return vocabulary.vocab_size
  return max(f.vocabulary.vocab_size for f in task.output_features.values())


def get_dataset(mixture_or_task_name: str,
                task_feature_lengths: Mapping[str, int],
                batch_size: int,
                *,
                split: str = 'train',
                shuffle: bool = True,
                seed: Optional[int] = 0,
                pack: bool = True,
                num_epochs: Optional[int] = None,
                vocabulary: Optional[seqio.Vocabulary] = None,
                feature_converter_cls=seqio.EncDecFeatureConverter,
                shard_id: Optional[int] = None,
                num_shards: Optional[int] = None,
                drop_remainder: bool = True) -> tf.data.Dataset:
  """This host's share of each global batch, as a tf.data.Dataset of numpy-able dicts.

  `batch_size` is the global batch size; each of `num_shards` hosts (default:
  the JAX processes) gets `batch_size // num_shards` examples of its own shard.
  A resumed run restores its iterator from the checkpoint (or `.skip`s to its
  data position). `drop_remainder=False` keeps a last, shorter batch.
  """
  num_shards = jax.process_count() if num_shards is None else num_shards
  shard_id = jax.process_index() if shard_id is None else shard_id
  if batch_size % num_shards:
    raise UserError(f'batch size {batch_size} is not divisible by the {num_shards} hosts; '
                    'set BATCH_SIZE to a multiple of the host count.')
  task = with_vocabulary(get_task_or_mixture(mixture_or_task_name), vocabulary)
  ds = task.get_dataset(
      dict(task_feature_lengths), split=split, shuffle=shuffle, seed=seed,
      num_epochs=num_epochs, use_cached=False,
      # A converter that checks lengths itself sees the features uncut.
      trim_output_features=getattr(getattr(feature_converter_cls, 'func', feature_converter_cls),
                                   'TRIM_OUTPUT_FEATURES', True),
      shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards))
  ds = feature_converter_cls(pack=pack)(ds, dict(task_feature_lengths))
  ds = ds.batch(batch_size // num_shards, drop_remainder=drop_remainder)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def next_numpy(iterator: tf.data.Iterator) -> dict[str, np.ndarray]:
  """The next batch as numpy arrays (the iterator stays checkpointable)."""
  return {k: v.numpy() for k, v in next(iterator).items()}
