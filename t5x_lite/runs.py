"""The run builder every entry point shares.

A run's configuration comes in small gin-bound groups, the T5X way:

  Data          which task or mixture, feature lengths, batch size, seed,
                packing and vocabulary;
  TrainConfig   the model, optimizer, Data, partitioner (a callable, so that
                `precompile` can build it on a TPU slice's devices), gradient
                accumulation and the initial checkpoint.

`Run` builds from them, once, what `train`, `eval`, `infer`, `benchmark`,
`precompile`, `precompute_reference` and `self_instruct` need: the task (its
data checked before anything is compiled), the vocabulary check, the dataset,
the global batch's shapes and the trainer.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import optax
import seqio

from t5x_lite import rollouts
from t5x_lite import trainer as trainer_lib
from t5x_lite.data import pipeline
from t5x_lite.data import registry
from t5x_lite.errors import UserError
from t5x_lite.models.base import BaseModel
from t5x_lite.partitioning import Partitioner


@dataclasses.dataclass(frozen=True)
class Data:
  """The input of a run: `batch_size` examples of `mixture_or_task_name`'s
  `split`, cut to `task_feature_lengths`, packed when `pack`."""
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  batch_size: int
  split: str = 'train'
  seed: Optional[int] = 0
  pack: bool = True
  vocabulary: Optional[seqio.Vocabulary] = None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What a train step is made of (shared by train, benchmark, precompile and
  precompute_reference)."""
  model: BaseModel
  optimizer: optax.GradientTransformation
  data: Data
  partitioner: Callable[..., Partitioner] = Partitioner
  num_microbatches: int = 1
  initial_checkpoint_path: Optional[str] = None
  # Param subtrees absent from the initial checkpoint (default: model.FRESH_PARAMS).
  fresh_params: Sequence[str] = ()

  def build(self, devices: Optional[Sequence[Any]] = None, check_data: bool = True) -> 'Run':
    """The run on `devices` (default: all); `check_data=False` for shapes only
    (the data and vocabulary are not checked)."""
    partitioner = self.partitioner(devices=devices) if devices is not None else self.partitioner()
    return Run(self.model, self.data, partitioner, check_data=check_data)


def check_vocab(model: BaseModel, vocab_size: int) -> None:
  model_vocab = model.config.vocab_size
  if vocab_size > model_vocab:
    raise UserError(f'the task vocabulary has {vocab_size} ids (sentinels included) but the '
                    f'model has vocab_size={model_vocab}; set the model config vocab_size '
                    f'to at least {vocab_size} (a multiple of 128 is fastest).')


def converter_batch_shapes(model: BaseModel, task_feature_lengths: Mapping[str, int],
                           batch_size: int, pack: bool) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch the feature converter feeds the train step, as shapes
  (no data read)."""
  converter = model.FEATURE_CONVERTER_CLS(pack=pack)
  if hasattr(converter, 'get_model_feature_lengths'):  # seqio's converters
    lengths = converter.get_model_feature_lengths(dict(task_feature_lengths))
    dtypes = getattr(converter, 'MODEL_FEATURE_DTYPES', {})  # WIT's float loss weights
    return {k: jax.ShapeDtypeStruct((batch_size, n), dtypes.get(k, np.int32))
            for k, n in lengths.items()}
  dummy = model.dummy_batch(batch_size, *task_feature_lengths.values())
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in dummy.items()}


class Run:
  """A model, its data and its partitioner, checked together once.

  Raises UserError at construction when the batch does not split over the
  devices and, with `check_data` (off for shapes only, as in precompile),
  when the data is missing or the task's vocabulary does not fit the model.
  """

  def __init__(self, model: BaseModel, data: Data, partitioner: Optional[Partitioner] = None,
               *, check_data: bool = True, converter: Any = None):
    self.model = model
    self.data = data
    self.partitioner = partitioner or Partitioner()
    self.partitioner.check_batch_size(data.batch_size)
    self.converter = converter or model.FEATURE_CONVERTER_CLS
    if check_data:
      registry.check_data_available(data.mixture_or_task_name, data.split)
      check_vocab(model, pipeline.output_vocab_size(self.task, data.vocabulary))

  @functools.cached_property
  def task(self) -> seqio.Task | seqio.Mixture:
    """The data's task or mixture, with the data's vocabulary when it has one."""
    return pipeline.with_vocabulary(
        registry.get_task_or_mixture(self.data.mixture_or_task_name), self.data.vocabulary)

  @property
  def batch_size(self) -> int:
    return self.data.batch_size

  @property
  def seed(self) -> Optional[int]:
    return self.data.seed

  @property
  def lengths(self) -> dict[str, int]:
    return dict(self.data.task_feature_lengths)

  @functools.cached_property
  def dataset(self):
    """This host's batches of the data's split (a tf.data.Dataset)."""
    d = self.data
    return pipeline.get_dataset(d.mixture_or_task_name, self.lengths, d.batch_size,
                                split=d.split, seed=d.seed, pack=d.pack,
                                vocabulary=d.vocabulary, feature_converter_cls=self.converter)

  @functools.cached_property
  def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes, from the dataset."""
    return {k: jax.ShapeDtypeStruct((self.batch_size,) + tuple(v.shape[1:]),
                                    v.dtype.as_numpy_dtype)
            for k, v in self.dataset.element_spec.items()}

  def trainer(self, optimizer: optax.GradientTransformation, num_microbatches: int = 1,
              batch_shapes: Optional[Mapping[str, jax.ShapeDtypeStruct]] = None
              ) -> trainer_lib.Trainer:
    """The trainer of this run (for `batch_shapes`, default the dataset's);
    for a `PolicyModel` (or LoRA around one), the RL iteration's
    `rollouts.RolloutTrainer`."""
    shapes = dict(batch_shapes or self.batch_shapes)
    if rollouts.policy_of(self.model) is not None:
      return rollouts.RolloutTrainer(self.model, optimizer, self.partitioner, shapes,
                                     num_microbatches, self.task.output_features['inputs'].vocabulary)
    return trainer_lib.Trainer(self.model, optimizer, self.partitioner, shapes, num_microbatches)
