"""Reward models trained on preference pairs (the first stage of RLHF).

`RewardModel` wraps a classification model with a scalar head
(`classification.GptClassificationModel` or `BertClassificationModel` with
`num_classes = 1`) and trains it on preference pairs with the Bradley–Terry
loss (Ouyang et al. 2022, InstructGPT):

    -log σ(r(x, y_c) - r(x, y_r) - m)  [+ c (r(x, y_c) + r(x, y_r))²]

m: the pair's 'margin' feature when the task has one (Llama 2's preference
rating margins), else the fixed `margin` (default 0). c:
`center_rewards_coefficient` (TRL's reward centring; default 0, off).

What the reward r(x, y) is read from:

  GPT   the prompt and the response as ONE causal sequence (the layout of
        `PreferenceFeatureConverter` and of a decoder-only policy's own
        rollouts: `decoder_target_tokens`, prompt then response then EOS,
        0-padded); the head reads the hidden state of the last real (non-0)
        token, the EOS.
  BERT  `[CLS] prompt [SEP] response [SEP]`
        (`cls_features.PreferenceBertFeatureConverter`); the head reads the
        tanh-pooled [CLS] output.

Both sides of a pair run through the network as one batch of 2B rows
(`preference.pair_batch`). `score(params, batch)` gives the [B] rewards of a
plain batch of single (prompt, response) examples, what infer writes and RL
rolls out against; `predict_batch` gives the same. The params are the
classifier's (the head is `FRESH_PARAMS`: a run starts it afresh from an LM
checkpoint given by INITIAL_CHECKPOINT_PATH).

Metrics (train and held-out, eval mode 'loss'): 'loss', 'accuracy' (the
pairwise accuracy: r_c > r_r), 'reward_margin' (mean r_c - r_r),
'chosen_rewards', 'rejected_rewards', 'num_examples' (pairs).

In gin (see configs/runs/reward.gin, gin/gpt_reward.gin, gin/bert_reward.gin):

    MODEL = @reward.RewardModel()
    reward.RewardModel.model = @classification.GptClassificationModel()
    classification.GptClassificationModel:
      config = @decoder.GPTConfig()
      num_classes = 1
"""

import functools
from typing import Any, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import losses
from t5x_lite.data import cls_features
from t5x_lite.data import feature_converters
from t5x_lite.errors import UserError
from t5x_lite.models import base
from t5x_lite.models import preference

Array = jax.Array
Batch = Mapping[str, Any]
SIDES = feature_converters.PREFERENCE_SIDES


def _one_side(batch: Batch) -> Batch:
  """The chosen side's features of a pair batch, unprefixed (a plain batch as is)."""
  prefix = SIDES[0] + '_'
  side = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
  return side or batch


class RewardModel(base.BaseModel):
  """A scalar reward r(prompt, response) trained on preference pairs.

  Args:
    model: a classification model with one output (num_classes = 1).
    margin: the fixed margin m of -log σ(r_c - r_r - m), for tasks without a
      per-pair 'margin' feature.
    center_rewards_coefficient: c of the centring term c (r_c + r_r)² (0: off;
      TRL suggests 0.01).
  """
  GENERATES = False
  SCORES_RESPONSES = True

  def __init__(self, model: Any, margin: float = 0.0,
               center_rewards_coefficient: float = 0.0):
    num_classes = getattr(model, 'num_classes', None)
    if not hasattr(model, 'class_logits') or num_classes != 1:
      got = type(model).__name__ + (f' with num_classes={num_classes}' if num_classes else '')
      raise UserError(f'RewardModel needs a scalar head: wrap classification.'
                      'GptClassificationModel or BertClassificationModel with num_classes = 1; '
                      f'got {got}.')
    if getattr(model, 'lm_weight', 0.0):
      raise UserError('a RewardModel\'s loss is the preference loss alone; set the '
                      'classification model\'s lm_weight = 0.')
    if center_rewards_coefficient < 0:
      raise UserError(f'center_rewards_coefficient={center_rewards_coefficient} must be >= 0 '
                      '(0 turns reward centring off; TRL suggests 0.01).')
    self.model = model
    self.config = model.config
    self.margin = float(margin)
    self.center_rewards_coefficient = float(center_rewards_coefficient)
    self.FRESH_PARAMS = model.FRESH_PARAMS  # pylint: disable=invalid-name
    self.DECODER_ONLY = model.DECODER_ONLY  # pylint: disable=invalid-name

  @property
  def max_length(self) -> Optional[int]:
    return self.model.max_length

  @property
  def computes_vocab_logits(self) -> bool:
    return False

  @property
  def FEATURE_CONVERTER_CLS(self):  # pylint: disable=invalid-name
    """Pairs (or single responses) in the layout the network reads (module doc)."""
    if self.DECODER_ONLY:
      return feature_converters.PreferenceFeatureConverter
    vocabulary = getattr(self.model.FEATURE_CONVERTER_CLS, 'keywords', {}).get('vocabulary')
    return functools.partial(cls_features.PreferenceBertFeatureConverter,
                             vocabulary=vocabulary)

  def network_batch(self, batch: Batch) -> Batch:
    """The classifier's features of a plain batch: GPT's from the causal
    sequence `decoder_target_tokens`, the head at its last non-0 token."""
    if not self.DECODER_ONLY or 'extract_position' in batch:
      return batch
    if 'decoder_target_tokens' not in batch:
      raise UserError('a GPT reward model reads decoder_target_tokens (prompt, response, EOS); '
                      f'the batch has {sorted(batch)}.')
    tokens = jnp.asarray(batch['decoder_target_tokens'], jnp.int32)
    real = (tokens != 0).astype(jnp.int32)
    return {'decoder_input_tokens': tokens, 'decoder_attention_mask': real,
            'extract_position': jnp.maximum(jnp.sum(real, axis=-1) - 1, 0)}

  def rewards(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """[B] float32 rewards of a plain batch; dropout iff `dropout_rng`."""
    return self.model.class_logits(params, self.network_batch(batch), dropout_rng)[:, 0]

  def dummy_batch(self, batch_size: int, *lengths: int) -> dict:
    """A pair batch as the feature converter gives it, each side of length
    sum(`lengths`) (prompt + response), for init and shapes."""
    length = sum(lengths)
    ones = np.ones((batch_size, length), np.int32)
    side = ({'decoder_input_tokens': ones, 'decoder_target_tokens': ones,
             'decoder_loss_weights': ones.astype(np.float32)} if self.DECODER_ONLY else
            {'input_tokens': ones, 'segment_ids': np.zeros_like(ones), 'attention_mask': ones})
    return {f'{s}_{k}': v for s in SIDES for k, v in side.items()}

  def init(self, rng: Array, batch: Batch):
    side = _one_side(batch)  # one side's shapes are the network's
    key = 'decoder_target_tokens' if self.DECODER_ONLY else 'input_tokens'
    if key not in side:
      raise UserError(f'a {"GPT" if self.DECODER_ONLY else "BERT"} reward model reads {key}; '
                      f'the batch has {sorted(batch)}: use the model\'s FEATURE_CONVERTER_CLS.')
    return self.model.init(rng, self.model.dummy_batch(*side[key].shape))

  def logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """[B,1] float32 rewards of a plain batch."""
    return self.rewards(params, batch, dropout_rng)[:, None]

  def score(self, params, batch: Batch) -> Array:
    """[B] rewards of a plain batch of (prompt, response) examples."""
    return self.rewards(params, batch)

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None,
                    **options) -> Array:
    """[B] rewards (decoding options are ignored: nothing is generated)."""
    del rng, options
    return self.rewards(params, batch)

  def loss_denominators(self, batch: Batch) -> dict[str, Array]:
    """What the loss and metrics of `batch` are divided by: its pairs."""
    first = next(v for k, v in batch.items() if k.startswith(SIDES[0] + '_'))
    return {'pairs': jnp.asarray(first.shape[0], jnp.float32)}

  def loss_fn(self, params, batch: Batch, dropout_rng: Optional[Array], *,
              denominators: Optional[Mapping[str, Array]] = None,
              frozen: Any = None) -> Tuple[Array, dict]:
    """(mean pair loss, metrics) of a preference batch (see the module doc)."""
    del frozen  # nothing frozen
    n = (self.loss_denominators(batch) if denominators is None else denominators)['pairs']
    pair = preference.pair_batch({k: v for k, v in batch.items() if k != 'margin'})
    chosen, rejected = jnp.split(self.rewards(params, pair, dropout_rng), 2)
    pair_losses = losses.bradley_terry_loss(chosen, rejected, batch.get('margin', self.margin),
                                            self.center_rewards_coefficient)
    mean = lambda x: jnp.sum(x) / n
    metrics = {
        'loss': mean(pair_losses),
        'accuracy': mean((chosen > rejected).astype(jnp.float32)),
        'reward_margin': mean(chosen - rejected),
        'chosen_rewards': mean(chosen),
        'rejected_rewards': mean(rejected),
        'num_examples': jnp.asarray(chosen.shape[0], jnp.float32),
    }
    return metrics['loss'], metrics
