"""Direct preference optimisation (DPO, IPO, conservative DPO) of a text model.

`DPOModel` wraps any token-loss family (GPT decoder-only, T5 or BART
encoder-decoder) and trains its params on preference pairs; its params ARE
the wrapped model's (a DPO checkpoint evaluates, generates and fine-tunes
with the plain model gin). The frozen reference model π_ref is either

  - a copy of the initial params (`reference_logps_path=None`): the model's
    `frozen_state`, which the trainer keeps in the train state (sharded like
    the params, never updated) and passes to `loss_fn`; or
  - precomputed: its sequence log-probs of every pair, written once by
    `t5x_lite.precompute_reference` to `reference_logps_path` and read into
    each batch by the feature converter, so no second model is on the
    devices.

Batches (see `feature_converters.PreferenceFeatureConverter`) carry each
side's features under the prefixes `chosen_` / `rejected_`, and features
both sides share (an encoder-decoder's prompt) without prefix. Both sides run
through the network as one batch of 2B rows.
"""

import functools
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from t5x_lite import losses
from t5x_lite.data import feature_converters
from t5x_lite.errors import UserError
from t5x_lite.models import base

Array = jax.Array
SIDES = feature_converters.PREFERENCE_SIDES
REFERENCE_FEATURES = tuple(f'reference_{s}_logps' for s in SIDES)


_PREFIXES = tuple(s + '_' for s in SIDES + ('reference',))


def _split_sides(batch: Mapping[str, Any]) -> Tuple[list, dict]:
  """([chosen features, rejected features] without their prefix, shared features)."""
  sides = [{k[len(s) + 1:]: v for k, v in batch.items() if k.startswith(s + '_')}
           for s in SIDES]
  return sides, {k: v for k, v in batch.items() if not k.startswith(_PREFIXES)}


def pair_batch(batch: Mapping[str, Array]) -> dict:
  """The chosen and rejected sequences of a preference batch as one batch:
  rows 0..B-1 chosen, B..2B-1 rejected."""
  sides, shared = _split_sides(batch)
  return {k: jnp.concatenate([side.get(k, shared.get(k)) for side in sides])
          for k in set(sides[0]) | set(shared)}


class DPOModel(base.BaseModel):
  """DPO of `model` (a `common.TokenLossModel`) on preference pairs.

  Args:
    model: the policy's family and config (e.g. %MODEL of a model gin).
    beta: β, the strength of the KL regularisation towards the reference.
    loss_type: 'sigmoid' (DPO) or 'ipo' (see `losses.dpo_loss`).
    label_smoothing: ε of conservative DPO ('sigmoid' only).
    reference_logps_path: None keeps the reference params in the train
      state; a path reads precomputed reference log-probs.
  """

  def __init__(self, model: Any, beta: float = 0.1, loss_type: str = 'sigmoid',
               label_smoothing: float = 0.0, reference_logps_path: Optional[str] = None):
    if loss_type not in losses.DPO_LOSS_TYPES:
      raise UserError(f'DPO loss_type={loss_type!r} is unknown; use one of '
                      f'{", ".join(losses.DPO_LOSS_TYPES)}.')
    if beta <= 0:
      raise UserError(f'DPO beta={beta} must be > 0; set DPO_BETA (0.1 is usual).')
    if not 0 <= label_smoothing < 0.5 or (label_smoothing and loss_type != 'sigmoid'):
      raise UserError(f'DPO label_smoothing={label_smoothing} must be in [0, 0.5) and '
                      "applies to loss_type='sigmoid' only.")
    self.model = model
    self.config = model.config
    self.beta = float(beta)
    self.loss_type = loss_type
    self.label_smoothing = float(label_smoothing)
    self.reference_logps_path = reference_logps_path
    # The policy's capabilities: a DPO checkpoint is the policy's.
    self.FRESH_PARAMS = model.FRESH_PARAMS  # pylint: disable=invalid-name
    self.DECODER_ONLY = model.DECODER_ONLY  # pylint: disable=invalid-name
    self.GENERATES = model.GENERATES  # pylint: disable=invalid-name

  @property
  def encoder_decoder(self) -> bool:
    return not self.model.DECODER_ONLY

  @property
  def max_length(self) -> Optional[int]:
    return self.model.max_length

  def frozen_state(self, params) -> Optional[dict]:
    """{'reference': a copy of the initial params}, unless precomputed."""
    if self.reference_logps_path is not None:
      return None
    return {'reference': jax.tree_util.tree_map(jnp.copy, params)}

  def frozen_shardings(self, param_shardings) -> Optional[dict]:
    return None if self.reference_logps_path is not None else {'reference': param_shardings}

  def logits(self, params, batch: Mapping[str, Array],
             dropout_rng: Optional[Array] = None) -> Array:
    """The policy's logits of a plain (not paired) batch."""
    return self.model.logits(params, batch, dropout_rng)

  def score(self, params, batch: Mapping[str, Array]) -> Array:
    """The policy's scores of a plain (not paired) batch."""
    return self.model.score(params, batch)

  def predict_batch(self, params, batch: Mapping[str, Array], rng: Optional[Array] = None,
                    **options):
    """The policy's predictions (generations) of a plain batch."""
    return self.model.predict_batch(params, batch, rng, **options)

  def converter_cls(self, with_reference: bool = True, **kwargs):
    """The family's preference feature converter (reading the cached
    reference log-probs when `with_reference` and they are precomputed)."""
    cls = (feature_converters.PreferenceEncDecFeatureConverter if self.encoder_decoder
           else feature_converters.PreferenceFeatureConverter)
    path = self.reference_logps_path if with_reference else None
    return functools.partial(cls, reference_logps_path=path, **kwargs)

  @property
  def FEATURE_CONVERTER_CLS(self):  # pylint: disable=invalid-name
    return self.converter_cls()

  def init(self, rng: Array, batch: Mapping[str, Any]):
    sides, shared = _split_sides(batch)  # one side's shapes are the network's
    return self.model.init(rng, {**shared, **sides[0]})

  def sequence_logps(self, params, batch: Mapping[str, Array],
                     dropout_rng: Optional[Array] = None) -> Array:
    """[N] sum of log p(target) x `decoder_loss_weights` of each row."""
    logits = self.model.logits(params, batch, dropout_rng)
    token_loss, _ = losses.token_cross_entropy(logits, batch['decoder_target_tokens'])
    return -jnp.sum(token_loss * batch['decoder_loss_weights'], axis=-1)

  def reference_logps(self, reference_params, batch: Mapping[str, Array],
                      pair: Mapping[str, Array]) -> Tuple[Array, Array]:
    """(chosen, rejected) [B] log-probs of the reference model, without gradient:
    the batch's precomputed ones, else the reference params' on `pair`
    (`pair_batch(batch)`)."""
    if all(k in batch for k in REFERENCE_FEATURES):
      return tuple(jnp.asarray(batch[k], jnp.float32) for k in REFERENCE_FEATURES)
    if reference_params is None:
      raise UserError('DPO needs the reference model: train through t5x_lite.trainer (it keeps '
                      'the initial params) or give REFERENCE_LOGPS_PATH.')
    return tuple(jnp.split(jax.lax.stop_gradient(self.sequence_logps(reference_params, pair)), 2))

  def loss_denominators(self, batch: Mapping[str, Array]) -> dict[str, Array]:
    """What the loss and metrics of `batch` are divided by: its pairs."""
    rows = batch[f'{SIDES[0]}_decoder_target_tokens'].shape[0]
    return {'pairs': jnp.asarray(rows, jnp.float32)}

  def loss_fn(self, params, batch: Mapping[str, Array], dropout_rng: Optional[Array], *,
              denominators: Optional[Mapping[str, Array]] = None,
              frozen: Optional[Mapping[str, Any]] = None) -> Tuple[Array, dict]:
    """(mean pair loss, metrics) of a preference batch; sums over pairs are
    divided by `denominators['pairs']` (default: the batch's pairs). The
    reference params are `frozen['reference']` (see `frozen_state`)."""
    n = (self.loss_denominators(batch) if denominators is None else denominators)['pairs']
    pair = pair_batch(batch)
    chosen, rejected = jnp.split(self.sequence_logps(params, pair, dropout_rng), 2)
    reference_params = None if frozen is None else frozen['reference']
    ref_chosen, ref_rejected = self.reference_logps(reference_params, batch, pair)
    pair_losses, chosen_rewards, rejected_rewards = losses.dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, beta=self.beta,
        loss_type=self.loss_type, label_smoothing=self.label_smoothing)
    mean = lambda x: jnp.sum(x) / n
    reward_accuracy = mean((chosen_rewards > rejected_rewards).astype(jnp.float32))
    metrics = {
        'loss': mean(pair_losses),
        'accuracy': reward_accuracy,  # the run-output contract's accuracy
        'reward_accuracy': reward_accuracy,
        'chosen_rewards': mean(chosen_rewards),
        'rejected_rewards': mean(rejected_rewards),
        'reward_margin': mean(chosen_rewards - rejected_rewards),
        'chosen_logps': mean(chosen),
        'rejected_logps': mean(rejected),
        'num_examples': jnp.asarray(chosen.shape[0], jnp.float32),
    }
    return metrics['loss'], metrics
