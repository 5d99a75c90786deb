"""The Model interface: what the trainer, evaluator, DPO wrapper, precompile,
benchmark and HF import program against.

A Model is a network and its config behind pure functions of (params, batch),
plus the capabilities callers may ask about without probing:

  FEATURE_CONVERTER_CLS  builds model features from a task's features
                         (called with `pack=`).
  FRESH_PARAMS           top-level param subtrees a fine-tune starts from
                         their random init (a classifier head), because a
                         pretrained checkpoint does not have them.
  DECODER_ONLY           inputs and targets are one token stream.
  GENERATES              `predict_batch` generates tokens (else it predicts
                         a class or a score).
  SCORES_RESPONSES       `score` of a (prompt, response) example is a scalar
                         reward (infer reads {"prompt", "response"} lines).
  computes_vocab_logits  whether a train step computes logits over the
                         vocabulary (for FLOP counts).
  max_length             the longest sequence its position embeddings
                         cover (None: any length).

State the trainer keeps but never updates (DPO's reference policy) is the
model's `frozen_state(params)`, created with the params and passed to every
`loss_fn` as `frozen`. A model with a `base_model` (`lora.LoraModel`) trains
its params over that model's frozen params, which the trainer passes as
`frozen['base']` and never checkpoints.

Losses divide sums by `loss_denominators(batch)`. With the whole batch's
denominators, the losses, metrics and gradients of its microbatches add up to
the whole batch's, which is what gradient accumulation relies on.
"""

import abc
from typing import Any, Mapping, Optional, Tuple

import jax

Array = jax.Array
Batch = Mapping[str, Any]


class BaseModel(abc.ABC):
  """The interface every family and wrapper implements (see module docstring)."""
  FEATURE_CONVERTER_CLS: Any = None
  FRESH_PARAMS: Tuple[str, ...] = ()
  DECODER_ONLY: bool = False
  GENERATES: bool = False
  SCORES_RESPONSES: bool = False
  # The model whose frozen params this one's params adapt (LoRA), or None.
  base_model: Optional['BaseModel'] = None
  config: Any

  @property
  def computes_vocab_logits(self) -> bool:
    return True

  @property
  def max_length(self) -> Optional[int]:
    return None

  @abc.abstractmethod
  def init(self, rng: Array, batch: Batch) -> Any:
    """Boxed variables (with logical partitioning metadata) for batches shaped
    like `batch` (arrays or shape/dtype structs)."""

  @abc.abstractmethod
  def loss_denominators(self, batch: Batch) -> dict[str, Array]:
    """What the losses and metrics of `batch` divide their sums by."""

  @abc.abstractmethod
  def loss_fn(self, params: Any, batch: Batch, dropout_rng: Optional[Array], *,
              denominators: Optional[Mapping[str, Array]] = None,
              frozen: Any = None) -> Tuple[Array, dict[str, Array]]:
    """(loss, metrics); dropout iff `dropout_rng`. Every metric is a sum
    divided by a denominator of `denominators` (default: `batch`'s own), or a
    count, so that microbatch metrics add up to the batch's."""

  @abc.abstractmethod
  def logits(self, params: Any, batch: Batch) -> Array:
    """The network's float32 output logits, dropout off."""

  @abc.abstractmethod
  def score(self, params: Any, batch: Batch) -> Array:
    """[B] a score per example (a sequence log-prob, or log p(label))."""

  @abc.abstractmethod
  def predict_batch(self, params: Any, batch: Batch, rng: Optional[Array] = None,
                    **options) -> Any:
    """Predictions of a batch: generated (tokens, scores) when GENERATES,
    else [B] classes or regression scores."""

  def inference_params(self, params: Any, frozen: Any) -> Any:
    """What `logits`, `score` and `predict_batch` take, given the trained
    params and the frozen state (LoRA: the base with the adapters attached)."""
    del frozen
    return params

  def initial_params(self, params: Any, base: Any) -> Any:
    """A model with a `base_model`: its params at step 0 given the frozen base
    params (LoRA: the modules it trains in full start from the base's)."""
    del base
    return params

  def frozen_state(self, params: Any) -> Any:
    """State created with the params and never trained (None: nothing)."""
    del params
    return None

  def frozen_shardings(self, param_shardings: Any) -> Any:
    """The shardings of `frozen_state`, given the params'."""
    del param_shardings
    return None
