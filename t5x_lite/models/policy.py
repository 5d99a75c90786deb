"""Policy optimisation of a text model against rewards: PPO, GRPO, RLOO.

`PolicyModel` wraps any token-loss family (GPT or Llama decoder-only, T5 or
BART encoder-decoder) as DPO's wrapper does: its params are the policy's,
plus `value_head` for PPO, so an RL checkpoint generates, evaluates and
fine-tunes with the plain model gin (which ignores the value head).

A train step of an RL run is one iteration (`t5x_lite.rollouts`): sample
responses to a batch of prompts, reward them, score them under the policy,
the frozen reference and the value head, then several epochs of clipped
updates on minibatches of that rollout batch. This module holds the model
side of it, as pure functions of (params, batch):

  ppo    InstructGPT (Ouyang et al., 2022) / TRL's PPOTrainer: the reward at
         each response's last token minus a per-token KL penalty
         kl_coef · (log π − log π_ref), fixed or adapted towards a target KL
         (Ziegler et al., 2019); GAE advantages (γ, λ) from a value head on
         the policy's final hidden states (one trunk, as TRL's
         AutoModelForCausalLMWithValueHead); the clipped policy objective and a
         clipped value loss (weight `value_coef`). Decoder-only policies.
  grpo   DeepSeekMath (Shao et al., 2024): `samples_per_prompt` responses per
         prompt, advantage (r − group mean) / group std for every token, the
         clipped objective plus kl_coef · k3(π, π_ref) in the loss.
  rloo   Ahmadian et al. (2024): as grpo with the leave-one-out baseline
         r − mean of the group's other rewards.

Losses are token means over the minibatch's response tokens (EOS included).
The frozen state holds the reference policy (a copy of the initial params)
and the KL coefficient, which an adaptive controller changes between
iterations (never the optimizer); both are checkpointed.

Batches. A prompt batch (`feature_converters.PromptFeatureConverter`):
`prompt_tokens` [B, P] (0-padded) and `prompt_length` [B]. A rollout batch
adds, per row: `responses` [B, R] (EOS included, 0 after), `response_mask`
[B, R], `old_logps`, `advantages` and, per algorithm, `ref_logps` (grpo,
rloo) or `returns`, `old_values` (ppo).
"""

import dataclasses
import functools
from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import layers
from t5x_lite import losses
from t5x_lite import rl_objectives as rl
from t5x_lite.data import feature_converters
from t5x_lite.errors import UserError
from t5x_lite.models import base
from t5x_lite.models import common

Array = jax.Array
Batch = Mapping[str, Any]
ALGORITHMS = ('ppo', 'grpo', 'rloo')
VALUE_HEAD = 'value_head'


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How an iteration samples and reuses its rollouts.

  samples_per_prompt: responses per prompt (G; GRPO / RLOO need >= 2).
  max_response_length: R, the longest response (EOS included).
  temperature, top_k, top_p: the sampling of `decoding.temperature_sample`.
  epochs: passes over each rollout batch.
  num_minibatches: updates per epoch (the rollout batch of prompts x G rows
    splits into that many).
  """
  samples_per_prompt: int = 1
  max_response_length: int = 32
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  epochs: int = 1
  num_minibatches: int = 1


class _ValueHead(nn.Module):
  """[..., D] hidden states -> [...] float32 values."""
  emb_dim: int

  @nn.compact
  def __call__(self, x, enable_dropout: bool = False):
    del enable_dropout
    dense = layers.Dense(1, kernel_axes=('embed', None), dtype='float32',
                         kernel_init=nn.initializers.zeros)
    return dense(x.astype(jnp.float32))[..., 0]


class PolicyModel(base.BaseModel):
  """PPO / GRPO / RLOO of `model` (a `common.TokenLossModel`).

  Args:
    model: the policy's family and config (%MODEL of a model gin).
    algorithm: 'ppo', 'grpo' or 'rloo' (module docstring).
    rollout: a `RolloutConfig`.
    reward: what rewards a response (`t5x_lite.rewards`): a function of the
      decoded prompt and response, or a `rewards.RewardModelReward`.
    clip_epsilon: ε of the clipped ratio.
    kl_coef: the initial coefficient of the KL to the reference.
    kl_target: None keeps kl_coef fixed; else the adaptive controller's
      target KL per response (ppo) with `kl_horizon`.
    value_coef, value_clip: the value loss's weight and clip range (ppo).
    gamma, lam: GAE's discount and λ (ppo).
    whiten_advantages: normalise PPO's advantages over the rollout batch.
    long_prompts: what a prompt longer than the 'inputs' length does:
      'error', 'skip' or 'keep_end' (`PromptFeatureConverter`).
  """

  def __init__(self, model: Any, algorithm: str = 'grpo',
               rollout: RolloutConfig = RolloutConfig(), reward: Any = None,
               clip_epsilon: float = 0.2, kl_coef: float = 0.05,
               kl_target: Optional[float] = None, kl_horizon: float = 10000.0,
               value_coef: float = 0.1, value_clip: float = 0.2,
               gamma: float = 1.0, lam: float = 0.95, whiten_advantages: bool = True,
               long_prompts: str = 'error'):
    if algorithm not in ALGORITHMS:
      raise UserError(f'RL algorithm={algorithm!r} is unknown; use one of {", ".join(ALGORITHMS)}.')
    if algorithm != 'ppo' and rollout.samples_per_prompt < 2:
      raise UserError(f'{algorithm} compares the responses to one prompt; set '
                      'RolloutConfig.samples_per_prompt >= 2 (8 or 16 is usual).')
    if algorithm == 'ppo' and not model.DECODER_ONLY:
      raise UserError('the PPO value head reads a decoder-only policy\'s hidden states; train '
                      f'{type(model).__name__} with algorithm grpo or rloo.')
    if reward is None:
      raise UserError('an RL run needs a reward: bind policy.PolicyModel.reward to a reward '
                      'function or @rewards.RewardModelReward() (see t5x_lite.rewards).')
    if clip_epsilon <= 0 or kl_coef < 0 or (kl_target is not None and kl_target <= 0):
      raise UserError(f'clip_epsilon={clip_epsilon} must be > 0, kl_coef={kl_coef} >= 0 and '
                      f'kl_target={kl_target} None or > 0.')
    self.model = model
    self.config = model.config
    self.algorithm = algorithm
    self.rollout = rollout
    self.reward = reward
    self.clip_epsilon = float(clip_epsilon)
    self.kl_coef = float(kl_coef)
    self.kl_target = kl_target
    self.kl_horizon = float(kl_horizon)
    self.value_coef = float(value_coef)
    self.value_clip = float(value_clip)
    self.gamma, self.lam = float(gamma), float(lam)
    self.whiten_advantages = whiten_advantages
    self.FRESH_PARAMS = tuple(model.FRESH_PARAMS) + (  # pylint: disable=invalid-name
        (VALUE_HEAD,) if self.has_value_head else ())
    self.DECODER_ONLY = model.DECODER_ONLY  # pylint: disable=invalid-name
    self.GENERATES = model.GENERATES  # pylint: disable=invalid-name
    feature_converters.PromptFeatureConverter(long_prompts=long_prompts)  # checks it
    self.FEATURE_CONVERTER_CLS = functools.partial(  # pylint: disable=invalid-name
        feature_converters.PromptFeatureConverter, long_prompts=long_prompts)

  @property
  def has_value_head(self) -> bool:
    return self.algorithm == 'ppo'

  @property
  def max_length(self) -> Optional[int]:
    return self.model.max_length

  # --- layouts ----------------------------------------------------------

  def dummy_batch(self, batch_size: int, prompt_length: int, *unused) -> dict:
    """A prompt batch of ones (for init / shapes)."""
    return {'prompt_tokens': np.ones((batch_size, prompt_length), np.int32),
            'prompt_length': np.full((batch_size,), prompt_length, np.int32)}

  def _network_dummy(self, batch: Batch) -> dict:
    rows, prompt = batch['prompt_tokens'].shape
    response = self.rollout.max_response_length
    if self.DECODER_ONLY:
      return self.model.dummy_batch(rows, prompt + response)
    return self.model.dummy_batch(rows, prompt, response)

  def generation_batch(self, batch: Batch) -> dict:
    """The family's decoding batch of a prompt batch (see its `_prefill`):
    decoder-only: BOS 0 then the prompt, causal, each row continuing from its
    own last prompt token; encoder-decoder: the prompt is the encoder input."""
    prompts = jnp.asarray(batch['prompt_tokens'], jnp.int32)
    if not self.DECODER_ONLY:
      return {'encoder_input_tokens': prompts}
    bos = jnp.zeros((prompts.shape[0], 1), jnp.int32)
    return {'decoder_input_tokens': jnp.concatenate([bos, prompts], axis=1),
            'decoder_prompt_lengths': jnp.asarray(batch['prompt_length'], jnp.int32)}

  def sequence_batch(self, batch: Batch) -> Tuple[dict, Array]:
    """(the family's teacher-forced batch of prompt + response, [B, R] index
    of each response token in its target axis).

    Decoder-only: one causal sequence, the response right after the prompt
    (length P + R); encoder-decoder: the prompt encoded, the response the
    decoder's targets.
    """
    prompts = jnp.asarray(batch['prompt_tokens'], jnp.int32)
    responses = jnp.asarray(batch['responses'], jnp.int32)
    rows, response_length = responses.shape
    if self.DECODER_ONLY:
      starts = jnp.asarray(batch['prompt_length'], jnp.int32)
      buffer = jnp.concatenate([prompts, jnp.zeros_like(responses)], axis=1)
      targets = jax.vmap(lambda b, r, s: jax.lax.dynamic_update_slice(b, r, (s,)))(
          buffer, responses, starts)
      index = starts[:, None] + jnp.arange(response_length)[None]
      features = {'decoder_target_tokens': targets}
    else:
      targets = responses
      index = jnp.broadcast_to(jnp.arange(response_length), (rows, response_length))
      features = {'encoder_input_tokens': prompts, 'decoder_target_tokens': targets}
    features['decoder_input_tokens'] = jnp.concatenate(
        [jnp.zeros((rows, 1), jnp.int32), targets[:, :-1]], axis=1)
    return features, index

  # --- the interface -----------------------------------------------------

  def _policy(self, params) -> Any:
    return {k: v for k, v in params.items() if k != VALUE_HEAD}

  def inference_params(self, params: Any, frozen: Any) -> Any:
    del frozen
    return self._policy(params)

  def init(self, rng: Array, batch: Batch):
    network_rng, head_rng = jax.random.split(rng)
    variables = self.model.init(network_rng, self._network_dummy(batch))
    if not self.has_value_head:
      return variables
    rows = batch['prompt_tokens'].shape[0]
    head = common.init_module(_ValueHead(self.config.emb_dim), head_rng,
                              {'x': jnp.zeros((rows, 1, self.config.emb_dim), jnp.float32)})
    return {**variables, 'params': {**variables['params'], VALUE_HEAD: head['params']}}

  def frozen_state(self, params) -> dict:
    """{'reference': a copy of the initial policy params, 'kl_coef': the
    KL coefficient (changed between iterations by the adaptive controller)}."""
    return {'reference': jax.tree_util.tree_map(jnp.copy, self._policy(params)),
            'kl_coef': jnp.asarray(self.kl_coef, jnp.float32)}

  def frozen_shardings(self, param_shardings) -> dict:
    policy = self._policy(param_shardings)
    some = jax.tree_util.tree_leaves(policy)[0]
    return {'reference': policy,
            'kl_coef': jax.sharding.NamedSharding(some.mesh, jax.sharding.PartitionSpec())}

  def logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """The policy's logits of a plain family batch."""
    return self.model.logits(self._policy(params), batch, dropout_rng)

  def score(self, params, batch: Batch) -> Array:
    return self.model.score(self._policy(params), batch)

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None, **options):
    """Generations for a prompt batch (or a plain family batch)."""
    if 'prompt_tokens' in batch:
      batch = self.generation_batch(batch)
    return self.model.predict_batch(self._policy(params), batch, rng, **options)

  def sample(self, params, batch: Batch, rng: Array) -> Array:
    """[B, R] responses sampled with the rollout settings (EOS included, 0 after)."""
    r = self.rollout
    tokens, _ = self.predict_batch(params, batch, rng, method='sample',
                                   max_decode_length=r.max_response_length,
                                   temperature=r.temperature, top_k=r.top_k, top_p=r.top_p)
    return tokens

  def token_stats(self, params, batch: Batch, dropout_rng: Optional[Array] = None,
                  policy_only: bool = False) -> dict:
    """Per response token of a rollout batch: 'logps' [B, R] of the policy,
    'entropy' [B, R] of its next-token distribution and, with a value head,
    'values' [B, R] (`policy_only`: logps and entropy of `params` taken as
    plain policy params, e.g. the reference's)."""
    features, index = self.sequence_batch(batch)
    gather = lambda x: jnp.take_along_axis(x, index, axis=1)
    if self.has_value_head and not policy_only:
      logits, hidden = self.model.logits_and_hidden(self._policy(params), features, dropout_rng)
      values = _ValueHead(self.config.emb_dim).apply({'params': params[VALUE_HEAD]}, hidden)
      stats = {'values': gather(values)}
    else:
      logits = self.model.logits(params if policy_only else self._policy(params), features,
                                 dropout_rng)
      stats = {}
    token_logps = losses.log_softmax_at_targets(logits, features['decoder_target_tokens'])
    stats['logps'] = gather(token_logps)
    stats['entropy'] = gather(rl.entropy_from_logits(logits))
    return stats

  def loss_denominators(self, batch: Batch) -> dict[str, Array]:
    """The minibatch's response tokens (losses are token means)."""
    return {'tokens': jnp.maximum(jnp.sum(jnp.asarray(batch['response_mask'], jnp.float32)), 1.0)}

  def loss_fn(self, params, batch: Batch, dropout_rng: Optional[Array], *,
              denominators: Optional[Mapping[str, Array]] = None,
              frozen: Optional[Mapping[str, Any]] = None) -> Tuple[Array, dict]:
    """(loss, metrics) of a rollout minibatch: the clipped policy objective,
    plus the value loss (ppo) or kl_coef x k3 KL to the reference (grpo, rloo)."""
    n = (self.loss_denominators(batch) if denominators is None else denominators)['tokens']
    mask = jnp.asarray(batch['response_mask'], jnp.float32)
    total = lambda x: jnp.sum(x * mask) / n
    stats = self.token_stats(params, batch, dropout_rng)
    policy_loss, clipped, approx_kl = rl.clipped_policy_loss(
        stats['logps'], batch['old_logps'], batch['advantages'], self.clip_epsilon)
    metrics = {'policy_loss': total(policy_loss), 'clip_fraction': total(clipped),
               'approx_kl': total(approx_kl), 'entropy': total(stats['entropy'])}
    loss = metrics['policy_loss']
    if self.has_value_head:
      value_loss, value_clipped = rl.clipped_value_loss(
          stats['values'], batch['old_values'], batch['returns'], self.value_clip)
      metrics.update(value_loss=total(value_loss), value_clip_fraction=total(value_clipped))
      loss = loss + self.value_coef * metrics['value_loss']
    else:
      kl = rl.kl_k3(stats['logps'], batch['ref_logps'])
      metrics['kl_loss'] = total(kl)
      loss = loss + frozen['kl_coef'] * metrics['kl_loss']
    metrics['loss'] = loss
    return loss, metrics

  # --- advantages of a scored rollout batch --------------------------------

  def advantages(self, scores: Array, stats: Mapping[str, Array], ref_logps: Array,
                 mask: Array, kl_coef: Array) -> dict:
    """The rollout batch's training targets from its rewards `scores` [N]
    and its policy `stats` (old logps, values): 'advantages' [N, R] and,
    for ppo, 'returns' [N, R] and 'old_values'."""
    if self.has_value_head:
      kl = rl.kl_k1(stats['logps'], ref_logps)
      rewards = rl.token_rewards(scores, kl, mask, kl_coef)
      values = stats['values'] * mask
      advantages, returns = rl.gae(rewards, values, mask, self.gamma, self.lam)
      if self.whiten_advantages:
        advantages = rl.masked_whiten(advantages, mask)
      return {'advantages': advantages, 'returns': returns, 'old_values': values}
    group = rl.group_advantages(scores, self.rollout.samples_per_prompt, self.algorithm)
    return {'advantages': group[:, None] * mask, 'ref_logps': ref_logps}

  def next_kl_coef(self, kl_coef: Array, kl: Array, num_responses: int) -> Array:
    """The coefficient after an iteration whose responses had mean KL `kl`."""
    if self.kl_target is None:
      return kl_coef
    return rl.adaptive_kl_coef(kl_coef, kl, self.kl_target, self.kl_horizon, num_responses)
