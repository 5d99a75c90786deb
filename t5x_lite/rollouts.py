"""The RL train step: one iteration of rollouts and updates (`policy.PolicyModel`).

`RolloutTrainer` is the `Trainer` of a run whose model is a `PolicyModel`;
`python -m t5x_lite.train` drives it like any other, so checkpoints,
SIGTERM / SIGKILL resume, non-finite handling and metrics are the same. One
train step is one iteration on one prompt batch of B prompts:

  1. rollout (jitted): each prompt repeated G = samples_per_prompt times,
     responses sampled from the policy with the KV cache, with a PRNG key
     folded from the state's key and step (a resumed run samples the same);
  2. reward: a Python function on the host over the decoded text, or a
     reward model inside step 3;
  3. score (jitted): the responses' log-probs under the policy and the
     frozen reference, values (PPO), KL and advantages;
  4. update (jitted): `epochs` passes over the B·G rows in `num_minibatches`
     shuffled minibatches, each one optimizer update of the model's
     clipped loss (dropout off: the ratio compares the same function);
     then the adaptive KL coefficient (PPO) and the step count.

A response ends at its first EOS (included) or at a sampled pad id 0 (not
included: the teacher-forced layout reads 0 as padding). Metrics per
iteration: reward_mean / reward_std, kl (per response, to the reference),
entropy, response_length, clip_fraction, approx_kl, policy_loss, value_loss
and explained_variance (PPO), kl_coef, rollout_seconds / update_seconds and
the tokens per second of each.
"""

import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio

from t5x_lite import checkpoints
from t5x_lite import rewards
from t5x_lite import rl_objectives as rl
from t5x_lite import trainer as trainer_lib
from t5x_lite.errors import UserError
from t5x_lite.models.policy import PolicyModel
from t5x_lite.partitioning import Partitioner

# Folded into the state's PRNG key for sampling (the updates use the key itself).
_SAMPLING = 0x524C


def policy_of(model: Any) -> Optional[PolicyModel]:
  """The `PolicyModel` a run trains: the model itself, or the base of a
  LoRA model around one (its adapters train, the base stays frozen and is
  the reference); None for any other model."""
  for m in (model, model.base_model):
    if isinstance(m, PolicyModel):
      return m
  return None


def response_mask(responses: jax.Array, eos_id: int) -> tuple[jax.Array, jax.Array]:
  """(responses with every token after the end set to 0, [N, R] float mask of
  the real tokens): a response ends at its first EOS (kept) or 0 (not kept)."""
  ended = jnp.cumsum((responses == eos_id) | (responses == 0), axis=1)
  at_end = (ended == 1) & (responses == eos_id)
  keep = (ended == 0) | at_end
  return jnp.where(keep, responses, 0), keep.astype(jnp.float32)


class RolloutTrainer(trainer_lib.Trainer):
  """A `Trainer` whose step is one RL iteration (module docstring).

  `model` is a `PolicyModel`, or a `lora.LoraModel` around one: then the
  adapters (and the value head, a new module) train, the frozen base is the
  reference, and the KL coefficient stays fixed.
  `vocabulary` decodes prompts and responses for a Python reward function.
  """

  def __init__(self, model: Any, optimizer: optax.GradientTransformation,
               partitioner: Partitioner, batch_shapes: dict[str, jax.ShapeDtypeStruct],
               num_microbatches: int = 1, vocabulary: Optional[seqio.Vocabulary] = None):
    self.policy = policy_of(model)
    if self.policy is not model and self.policy.kl_target is not None:
      raise UserError('a LoRA policy keeps KL_COEF fixed; set KL_TARGET = None.')
    super().__init__(model, optimizer, partitioner, batch_shapes, num_microbatches)
    r = self.policy.rollout
    prompts, self.prompt_length = batch_shapes['prompt_tokens'].shape
    self.rows = prompts * r.samples_per_prompt
    dp = partitioner.data_parallel_size
    if r.num_minibatches < 1 or self.rows % (r.num_minibatches * dp) or r.epochs < 1:
      raise UserError(
          f'RolloutConfig.num_minibatches={r.num_minibatches} must split the {self.rows} '
          f'responses of an iteration (BATCH_SIZE x samples_per_prompt) into equal minibatches '
          f'over the {dp} data-parallel devices, and epochs={r.epochs} must be >= 1.')
    trainer_lib.check_microbatches(self.rows // r.num_minibatches, num_microbatches, dp)
    self.vocabulary = vocabulary
    self.eos_id = 1 if vocabulary is None else vocabulary.eos_id
    self.reward_model, self.reward_params = None, None
    if isinstance(self.policy.reward, rewards.RewardModelReward):
      self.reward_model = self.policy.reward.model
    elif vocabulary is None:
      raise UserError('a reward function reads text: the run needs the task\'s vocabulary.')
    self._compiled = None

  @property
  def tokens_per_batch(self) -> int:
    """Tokens of an iteration's rollouts (prompt + response buffers)."""
    return self.rows * (self.prompt_length + self.policy.rollout.max_response_length)

  # --- the reward model ----------------------------------------------------

  def _load_reward_model(self) -> Any:
    """The reward model's params, sharded; one line when they cannot serve."""
    rm, policy = self.reward_model, self.policy
    length = self.prompt_length + policy.rollout.max_response_length
    if not rm.DECODER_ONLY or rm.config.vocab_size != policy.config.vocab_size:
      raise UserError(f'the reward model ({type(rm.model).__name__}, vocab_size '
                      f'{rm.config.vocab_size}) must be decoder-only with the policy\'s '
                      f'vocab_size {policy.config.vocab_size}: it scores the policy\'s tokens.')
    if rm.max_length is not None and rm.max_length < length:
      raise UserError(f'the reward model reads {rm.max_length} positions and a prompt + '
                      f'response takes {length}; shorten TASK_FEATURE_LENGTHS or '
                      'max_response_length.')
    shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
              for k, v in rm.dummy_batch(self.rows, length).items()}
    abstract, shardings = trainer_lib.abstract_params(rm, self.partitioner, shapes)
    path = self.policy.reward.checkpoint_path
    try:
      params = checkpoints.restore_params(path, abstract)
    except UserError as e:
      raise UserError(f'the reward model checkpoint {path} does not match the reward model '
                      f'config bound in gin ({e})') from None
    return jax.device_put(params, shardings)

  # --- the jitted phases -----------------------------------------------------

  def _params(self, state: trainer_lib.TrainState) -> Any:
    """The policy's params (a LoRA policy's: the base with the adapters)."""
    return self.model.inference_params(state.params, state.frozen) if (
        self.policy is not self.model) else state.params

  def _frozen(self, state: trainer_lib.TrainState) -> dict:
    """The policy's frozen state: the state's, or a LoRA policy's from its base."""
    return state.frozen if self.policy is self.model else self.policy.frozen_state(
        self.policy.inference_params(state.frozen[trainer_lib.BASE], None))

  def _rollout(self, state: trainer_lib.TrainState, prompts: dict, rng: jax.Array):
    g = self.policy.rollout.samples_per_prompt
    batch = {k: jnp.repeat(v, g, axis=0) for k, v in prompts.items()}
    responses, mask = response_mask(self.policy.sample(self._params(state), batch, rng),
                                    self.eos_id)
    return {**batch, 'responses': responses, 'response_mask': mask}

  def _score(self, state: trainer_lib.TrainState, batch: dict, scores: jax.Array,
             reward_params: Any):
    model, mask, frozen = self.policy, batch['response_mask'], self._frozen(state)
    if self.reward_model is not None:
      features, _ = model.sequence_batch(batch)
      scores = self.reward_model.score(reward_params,
                                       {'decoder_target_tokens': features['decoder_target_tokens']})
    stats = model.token_stats(self._params(state), batch)
    ref_logps = model.token_stats(frozen['reference'], batch, policy_only=True)['logps']
    targets = model.advantages(scores, stats, ref_logps, mask, frozen['kl_coef'])
    lengths = jnp.sum(mask, axis=1)
    metrics = {
        'reward_mean': jnp.mean(scores), 'reward_std': jnp.std(scores),
        'kl': jnp.mean(jnp.sum(rl.kl_k1(stats['logps'], ref_logps) * mask, axis=1)),
        'entropy': rl.masked_mean(stats['entropy'], mask),
        'response_length': jnp.mean(lengths),
        'kl_coef': frozen['kl_coef'],
    }
    if model.has_value_head:
      metrics['explained_variance'] = rl.explained_variance(
          targets['old_values'], targets['returns'], mask)
    rollout = {**batch, **targets, 'old_logps': stats['logps']}
    return rollout, metrics

  def _update_all(self, state: trainer_lib.TrainState, rollout: dict, kl: jax.Array):
    r = self.policy.rollout
    rng = jax.random.fold_in(state.rng, state.step)
    order = jnp.concatenate([jax.random.permutation(jax.random.fold_in(rng, e), self.rows)
                             for e in range(r.epochs)])
    order = order.reshape(r.epochs * r.num_minibatches, -1)
    sharding = self.batch_sharding

    def one(state, inputs):
      i, rows = inputs
      minibatch = {k: jax.lax.with_sharding_constraint(v[rows], sharding)
                   for k, v in rollout.items()}
      params, opt_state, metrics = self._update(state, minibatch, jax.random.fold_in(rng, i))
      return state.replace(params=params, opt_state=opt_state), metrics

    state, history = jax.lax.scan(one, state, (jnp.arange(order.shape[0]), order))
    metrics = {k: jnp.mean(v) for k, v in history.items()}
    metrics['nonfinite_steps'] = jnp.max(history['nonfinite_steps'])
    if self.policy is self.model:  # (a LoRA policy's coefficient is fixed)
      kl_coef = self.policy.next_kl_coef(state.frozen['kl_coef'], kl, self.rows)
      state = state.replace(frozen={**state.frozen, 'kl_coef': kl_coef})
    return state.replace(step=state.step + 1), metrics

  def compile(self) -> float:
    """Compiles the three phases for the state and prompt batch; returns seconds."""
    start = time.perf_counter()
    if self.reward_model is not None and self.reward_params is None:
      self.reward_params = self._load_reward_model()
    data, replicated = self.batch_sharding, self.partitioner.replicated
    state = self.abstract_state()
    prompts = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data)
               for k, v in self.batch_shapes.items()}
    key = jax.ShapeDtypeStruct(state.rng.shape, state.rng.dtype, sharding=replicated)
    with self.partitioner.activate():
      rollout = jax.jit(self._rollout, in_shardings=(self.state_shardings, data, replicated),
                        out_shardings=data).lower(state, prompts, key).compile()
      batch = jax.tree_util.tree_map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=data),
          jax.eval_shape(self._rollout, state, prompts, key))
      scores = jax.ShapeDtypeStruct((self.rows,), jnp.float32, sharding=data)
      reward_params = jax.tree_util.tree_map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
          self.reward_params)
      score = jax.jit(self._score, out_shardings=(data, replicated)).lower(
          state, batch, scores, reward_params).compile()
      scored = jax.tree_util.tree_map(
          lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=data),
          jax.eval_shape(self._score, state, batch, scores, reward_params)[0])
      kl = jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated)
      update = jax.jit(self._update_all, out_shardings=(self.state_shardings, replicated),
                       donate_argnums=0).lower(state, scored, kl).compile()
    self._compiled = (rollout, score, update)
    self._compiled_step = update
    self._update_args = (state, scored, kl)
    return time.perf_counter() - start

  # --- one iteration ---------------------------------------------------------

  def _decode(self, tokens: np.ndarray) -> list[str]:
    out = []
    for row in tokens.tolist():
      ids = [t for t in row if t != 0]
      if self.eos_id in ids:
        ids = ids[:ids.index(self.eos_id)]
      out.append(self.vocabulary.decode(ids))
    return out

  def _check_prompts(self, prompts: dict) -> None:
    lengths = np.asarray(jax.device_get(prompts['prompt_length']))
    if lengths.size and lengths.max() > self.prompt_length:
      raise UserError(f'a prompt of {int(lengths.max())} tokens is longer than '
                      f"TASK_FEATURE_LENGTHS['inputs'] = {self.prompt_length}; raise it, or "
                      "set LONG_PROMPTS = 'skip' or 'keep_end' (policy.PolicyModel.long_prompts).")

  def iteration(self, state: trainer_lib.TrainState, prompts: dict):
    """(state, metrics) after one iteration on the prompt batch (sharded)."""
    if self._compiled is None:
      self.compile()
    rollout_fn, score_fn, update_fn = self._compiled
    self._check_prompts(prompts)
    start = time.perf_counter()
    key = jax.random.fold_in(jax.random.fold_in(state.rng, _SAMPLING), state.step)
    batch = jax.block_until_ready(rollout_fn(state, prompts, key))
    if self.reward_model is None:
      host = jax.device_get({k: batch[k] for k in ('prompt_tokens', 'responses')})
      values = rewards.host_rewards(self.policy.reward, self._decode(host['prompt_tokens']),
                                    self._decode(host['responses']))
      scores = jax.device_put(values, self.batch_sharding)
    else:
      scores = jax.device_put(np.zeros((self.rows,), np.float32), self.batch_sharding)
    rollout, metrics = jax.block_until_ready(score_fn(state, batch, scores, self.reward_params))
    middle = time.perf_counter()
    state, update_metrics = jax.block_until_ready(update_fn(state, rollout, metrics['kl']))
    end = time.perf_counter()
    r = self.policy.rollout
    seconds = {'rollout_seconds': middle - start, 'update_seconds': end - middle}
    generated = float(metrics['response_length']) * self.rows
    seconds['rollout_tokens_per_second'] = generated / seconds['rollout_seconds']
    seconds['update_tokens_per_second'] = (r.epochs * self.tokens_per_batch
                                           / seconds['update_seconds'])
    return state, {**update_metrics, **metrics, **seconds}

  @property
  def train_step(self):
    return self.iteration

  def memory(self) -> trainer_lib.StepMemory:
    """XLA's memory estimate, per device, of the phase that needs the most."""
    if self._compiled is None:
      self.compile()
    return max((trainer_lib.StepMemory.of(c) for c in self._compiled),
               key=lambda m: m.total_bytes)

  def step_jaxpr(self):
    """The jaxpr of the update phase (the compiled step's FLOPs are its)."""
    if self._compiled is None:
      self.compile()
    with self.partitioner.activate():
      return jax.make_jaxpr(self._update_all)(*self._update_args).jaxpr
