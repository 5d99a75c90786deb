"""What every model family's Model wrapper shares.

`Model` holds the plumbing (the network's input features, init, apply with
or without dropout). `TokenLossModel` adds the per-token cross-entropy loss,
metrics and scores over the `decoder_*` features, shared by the
encoder-decoder (T5, BART) and decoder-only (GPT) families.

`run_layers` builds every family's stack of identical layers, driven by two
config fields (bindable from gin like the others):

  scan_layers   False: layers `layers_0 .. layers_{n-1}` in a Python loop.
                True: one `layers` module under `nn.scan`, its params stacked
                on a leading [n] axis named 'layers' (replicated by the rule
                sets), so compile time does not grow with depth.
  remat_policy  what the backward pass keeps from each layer's forward pass
                (see REMAT_POLICIES); 'none' keeps everything.

`param_layout.stack_layers` / `unstack_layers` convert params between the two
layouts.
"""

import functools
from typing import Any, Mapping, Optional, Tuple, Union

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import decoding
from t5x_lite import layers
from t5x_lite import losses
from t5x_lite import param_layout
from t5x_lite.errors import UserError
from t5x_lite.models import base

Array = jax.Array
Batch = Mapping[str, Any]

_DROPOUT_RATES = ('dropout_rate', 'attention_dropout_rate', 'activation_dropout_rate')


# remat_policy name -> jax.checkpoint policy (None: save nothing).
REMAT_POLICIES = {
    'none': None,  # no rematerialisation
    'full': None,  # recompute the whole layer in the backward pass
    'dots_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(name: str) -> None:
  """Raises UserError unless `name` is one of REMAT_POLICIES."""
  if name not in REMAT_POLICIES:
    raise UserError(f'remat_policy={name!r} is unknown; use one of '
                    f"{', '.join(REMAT_POLICIES)}.")


def _scan_body(layer: nn.Module, x: Array, *args):
  return layer(x, *args), None


def run_layers(layer_cls: Any, config: Any, num_layers: int, x: Array,
               *args, decode: bool = False) -> Array:
  """`x` through `num_layers` layers `layer_cls(config)`, in order.

  Call inside a compact method: the layers are children of that module.
  Every layer gets `(x, *args)`; the last arg is the static `deterministic`
  flag. `config.scan_layers` and `config.remat_policy` choose the layout and
  the rematerialisation (see the module docstring). `decode=True` builds
  `layer_cls(config, decode=True)` (KV-cached decoding; no remat); scanned,
  the 'cache' collection is stacked on axis 1 so that every cache leaf
  keeps the batch on axis 0.
  """
  check_remat_policy(config.remat_policy)
  if decode:
    layer_cls = functools.partial(layer_cls, decode=True)
  elif config.remat_policy != 'none':
    layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[config.remat_policy],
                         prevent_cse=not config.scan_layers,
                         static_argnums=(len(args) + 1,))  # 0 is self
  if not config.scan_layers:
    for i in range(num_layers):
      x = layer_cls(config, name=f'layers_{i}')(x, *args)
    return x
  scan = nn.scan(_scan_body, variable_axes={'params': 0, 'cache': 1},
                 split_rngs={'params': True, 'dropout': True},
                 in_axes=(nn.broadcast,) * len(args), length=num_layers,
                 metadata_params={nn.PARTITION_NAME: 'layers'})
  x, _ = scan(layer_cls(config, name='layers'), x, *args)
  return x


def decode_self_mask(positions: Array, cache_length: int,
                     prefix_lengths: Optional[Array] = None) -> Array:
  """[B,1,T,C] self-attention mask over the C cache slots for KV-cached decoding.

  A query at position q ([B,T] `positions`) sees the slots <= q, and with
  `prefix_lengths` [B] also every slot < prefix_lengths (a prefix LM's
  bidirectional prompt).
  """
  slots = jnp.arange(cache_length)[None]
  prefix = None if prefix_lengths is None else slots < prefix_lengths[:, None]
  return layers.make_attention_mask(None, None, causal=True, query_positions=positions,
                                    key_positions=slots, key_prefix=prefix)


def set_cache_index(cache: Any, index: Array) -> Any:
  """`cache` with every attention layer's `cache_index` set to `index` [B]."""
  def fix(path, leaf):
    if getattr(path[-1], 'key', None) != 'cache_index':
      return leaf
    shape = (-1,) + (1,) * (leaf.ndim - 1)  # scanned: [B, layers]
    return jnp.broadcast_to(index.reshape(shape), leaf.shape).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(fix, cache)


def to_config_layout(params: Mapping[str, Any], config: Any) -> Mapping[str, Any]:
  """Unscanned params in `config`'s layout (stacked iff `config.scan_layers`)."""
  return param_layout.stack_layers(params) if config.scan_layers else params


def dtypes(config: Any) -> dict:
  """`dtype` (activations) and `param_dtype` of a config, as layer kwargs."""
  return dict(dtype=config.dtype, param_dtype=config.param_dtype)


def normal_init(config: Any) -> layers.Initializer:
  """normal(config.initializer_range), the BERT / GPT-2 / BART init."""
  return nn.initializers.normal(stddev=config.initializer_range)


def layer_norm(config: Any, name: str) -> layers.LayerNorm:
  return layers.LayerNorm(epsilon=config.layer_norm_eps, name=name, **dtypes(config))


def dropout(config: Any, x: Array, deterministic: bool) -> Array:
  """Element-wise dropout at `config.dropout_rate` (embeddings, residuals)."""
  return nn.Dropout(config.dropout_rate)(x, deterministic=deterministic)


def attention(config: Any, name: str, **kwargs) -> layers.Attention:
  """The attention of BERT, GPT-2 and BART: biased projections, logits scaled
  by 1/sqrt(head_dim), element-wise dropout on the weights."""
  return layers.Attention(
      num_heads=config.num_heads, head_dim=config.head_dim, use_bias=True,
      scale_logits=True, dropout_rate=config.attention_dropout_rate,
      dropout_broadcast_dims=(), kernel_init=normal_init(config), name=name,
      **kwargs, **dtypes(config))


def mlp(config: Any, **kwargs) -> layers.BiasedMlp:
  """The MLP of BERT, GPT-2 and BART (`activation_dropout_rate`: BART's)."""
  return layers.BiasedMlp(
      config.mlp_dim, activation=config.activation,
      dropout_rate=getattr(config, 'activation_dropout_rate', 0.0),
      kernel_init=normal_init(config), name='mlp', **kwargs, **dtypes(config))


def post_norm(config: Any, name: str, x: Array, y: Array, deterministic: bool) -> Array:
  """LN(x + dropout(y)): a post-norm residual (BERT, BART)."""
  return layer_norm(config, name)(x + dropout(config, y, deterministic))


class PostNormEncoderLayer(nn.Module):
  """The encoder block of BERT and BART: x = LN(x + attn(x)); x = LN(x + mlp(x))."""
  config: Any

  @nn.compact
  def __call__(self, x, mask, deterministic):
    cfg = self.config
    y = attention(cfg, 'attention')(x, x, mask, deterministic=deterministic)
    x = post_norm(cfg, 'post_attention_layer_norm', x, y, deterministic)
    y = mlp(cfg)(x, deterministic)
    x = post_norm(cfg, 'post_mlp_layer_norm', x, y, deterministic)
    return layers.constrain(x, ('batch', 'length', 'embed'))


def init_module(module: nn.Module, rng: jax.Array, inputs: Mapping[str, Any]):
  """Boxed variables (with logical partitioning metadata) of `module`.

  `inputs` values may be arrays or shape/dtype structs; only shapes matter.
  """
  arrays = {k: v if isinstance(v, (jax.Array, np.ndarray)) else jnp.ones(v.shape, v.dtype)
            for k, v in inputs.items()}
  params_rng, dropout_rng = jax.random.split(rng)
  return module.init({'params': params_rng, 'dropout': dropout_rng}, **arrays,
                     enable_dropout=False)


class Model(base.BaseModel):
  """A network (`NETWORK_CLS(config)`) behind pure functions of (params, batch).

  Subclasses name the batch features the network takes (`NETWORK_FEATURES`,
  passed when present) and those it cannot do without (`REQUIRED_FEATURES`).
  """
  NETWORK_CLS: Any = None
  NETWORK_FEATURES: Tuple[str, ...] = ()
  REQUIRED_FEATURES: Tuple[str, ...] = ()
  FEATURE_CONVERTER_CLS: Any = None

  def __init__(self, config: Any):
    check_remat_policy(getattr(config, 'remat_policy', 'none'))
    self.config = config
    self.module = self.NETWORK_CLS(config)

  @property
  def max_length(self) -> Optional[int]:
    """The config's `max_positions` (learned position embeddings), else None."""
    return getattr(self.config, 'max_positions', None)

  def _network_inputs(self, batch: Batch) -> dict:
    missing = [k for k in self.REQUIRED_FEATURES if k not in batch]
    if missing:
      raise KeyError(f'Batch is missing features {missing}; has {sorted(batch)}.')
    return {k: batch[k] for k in self.NETWORK_FEATURES if k in batch}

  def init(self, rng: Array, batch: Batch):
    """Boxed variables (with logical partitioning metadata).

    `batch` values may be arrays or shape/dtype structs; only shapes matter.
    """
    return init_module(self.module, rng, self._network_inputs(batch))

  def _apply(self, params, batch: Batch, dropout_rng: Optional[Array] = None, **kwargs):
    """The network's output; dropout iff `dropout_rng` and a config rate > 0."""
    rates = [getattr(self.config, name, 0.0) for name in _DROPOUT_RATES]
    enable_dropout = dropout_rng is not None and max(rates) > 0
    rngs = {'dropout': dropout_rng} if enable_dropout else None
    return self.module.apply({'params': params}, **self._network_inputs(batch),
                             enable_dropout=enable_dropout, rngs=rngs, **kwargs)


class TokenLossModel(Model):
  """Loss, metrics, logits and scores over `decoder_target_tokens`.

  Loss normalisation (`loss_normalizing_factor`):
    None or 'NUM_REAL_TARGET_TOKENS' (default): the weighted summed loss is
      divided by the sum of `decoder_loss_weights` (tokens with non-zero
      weight when weights are 0/1).
    'NUM_WEIGHTED_TOKENS': divided by the number of tokens whose weight is
      not 0 (the weighted instruction tuning loss: sum_i(λp·prompt_loss_i +
      λr·response_loss_i) over the count of weighted tokens).
    a float: divided by that constant (T5X's constant-factor mode).
  Without `decoder_loss_weights` the weights are `decoder_target_tokens !=
  config.pad_id` (pad_id 0 unless the config has one).
  """

  GENERATES = True

  def __init__(self,
               config: Any,
               z_loss: float = 0.0,
               label_smoothing: float = 0.0,
               loss_normalizing_factor: Union[None, str, float] = None,
               feature_converter_cls: Any = None):
    if isinstance(loss_normalizing_factor, str):
      if loss_normalizing_factor not in ('NUM_REAL_TARGET_TOKENS', 'NUM_WEIGHTED_TOKENS'):
        raise ValueError(
            f'loss_normalizing_factor={loss_normalizing_factor!r} is not '
            "supported; use None, 'NUM_REAL_TARGET_TOKENS', "
            "'NUM_WEIGHTED_TOKENS' or a number.")
      if loss_normalizing_factor == 'NUM_REAL_TARGET_TOKENS':
        loss_normalizing_factor = None
    super().__init__(config)
    if feature_converter_cls is not None:  # e.g. the WIT converter, from gin
      self.FEATURE_CONVERTER_CLS = feature_converter_cls
    self.z_loss = z_loss
    self.label_smoothing = label_smoothing
    self.loss_normalizing_factor = loss_normalizing_factor

  def logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """[B,T,V] float32 logits; dropout iff `dropout_rng` and a rate > 0."""
    return self._apply(params, batch, dropout_rng).astype(jnp.float32)

  def logits_and_hidden(self, params, batch: Batch,
                        dropout_rng: Optional[Array] = None) -> Tuple[Array, Array]:
    """([B,T,V] float32 logits, [B,T,D] final hidden states) in one pass, for
    a head beside the LM head; decoder-only networks (GPT, Llama)."""
    logits, hidden = self._apply(params, batch, dropout_rng, method='logits_and_hidden')
    return logits.astype(jnp.float32), hidden

  def _weights(self, batch: Batch) -> Array:
    weights = batch.get('decoder_loss_weights')
    if weights is None:
      weights = batch['decoder_target_tokens'] != getattr(self.config, 'pad_id', 0)
    return jnp.asarray(weights, jnp.float32)

  @staticmethod
  def _num_examples(batch: Batch) -> Array:
    """Rows, or packed segments (segment ids are 1..k per row) when packed."""
    seg = batch.get('decoder_segment_ids')
    if seg is None:
      return jnp.asarray(batch['decoder_target_tokens'].shape[0], jnp.float32)
    return jnp.sum(jnp.max(seg, axis=-1)).astype(jnp.float32)

  def loss_denominators(self, batch: Batch) -> dict[str, Array]:
    """What the loss and metrics of `batch` are divided by (see `loss_fn`)."""
    weights = self._weights(batch)
    weight_sum = jnp.sum(weights)
    tokens = jnp.where(weight_sum > 0, weight_sum, 1.0)
    if self.loss_normalizing_factor is None:
      loss = tokens
    elif isinstance(self.loss_normalizing_factor, str):  # NUM_WEIGHTED_TOKENS
      loss = jnp.maximum(jnp.sum(weights != 0), 1).astype(jnp.float32)
    else:
      loss = jnp.asarray(self.loss_normalizing_factor, jnp.float32)
    return {'loss': loss, 'tokens': tokens}

  def loss_fn(self, params, batch: Batch, dropout_rng: Optional[Array], *,
              denominators: Optional[Mapping[str, Array]] = None,
              frozen: Any = None) -> Tuple[Array, dict]:
    """(normalised loss, metrics). Dropout iff dropout_rng and a rate > 0.

    Sums are divided by `denominators` (default: `batch`'s own), so that with
    the denominators of a whole batch the losses and metrics of its
    microbatches add up to the whole batch's.
    """
    del frozen  # nothing frozen
    d = self.loss_denominators(batch) if denominators is None else denominators
    logits = self._apply(params, batch, dropout_rng)
    targets = batch['decoder_target_tokens']
    weights = self._weights(batch)
    loss_sum, z_loss_sum, weight_sum = losses.cross_entropy_with_logits(
        logits, targets, weights, z_loss=self.z_loss,
        label_smoothing=self.label_smoothing)
    correct, _ = losses.weighted_accuracy(logits, targets, weights)
    loss = loss_sum / d['loss']
    metrics = {
        'loss': loss,
        'cross_ent_loss': (loss_sum - z_loss_sum) / d['loss'],
        'z_loss': z_loss_sum / d['loss'],
        'accuracy': correct / d['tokens'],
        'num_tokens': weight_sum,
        'num_examples': self._num_examples(batch),
    }
    return loss, metrics

  def score(self, params, batch: Batch) -> Array:
    """[B] sum over positions of weight * log p(target) (rank classification)."""
    token_scores = losses.log_softmax_at_targets(
        self.logits(params, batch), batch['decoder_target_tokens'])
    return jnp.sum(token_scores * self._weights(batch), axis=-1)

  # --- decoding (see t5x_lite.decoding) ---------------------------------
  #
  # A family implements `_prefill` and `_cached_logits`; the search runs on
  # the cache {'variables': the network's 'cache' collection,
  # 'positions': [B] position of the next fed token, **extras}.

  def _prefill(self, params, batch: Batch, max_decode_length: Optional[int]):
    """-> (start tokens [B], start positions [B], cache variables, extras
    dict of [B, ...] arrays, cache length, max_decode_length)."""
    raise NotImplementedError(f'{type(self).__name__} cannot decode.')

  def _cached_logits(self, params, variables, tokens: Array, positions: Array,
                     extras: Mapping[str, Array], cache_length: int):
    """-> ([B,T,V] logits, new cache variables) for tokens at positions."""
    raise NotImplementedError(f'{type(self).__name__} cannot decode.')

  def decode(self, params, batch: Batch, rng: Optional[Array] = None, *,
             method: str = 'greedy', max_decode_length: Optional[int] = None,
             num_beams: int = 4, alpha: float = 0.6, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, eos_id: int = 1,
             return_all_beams: bool = False) -> decoding.DecodeOutput:
    """Generates continuations with a KV cache; see `predict_batch`."""
    if method not in ('greedy', 'sample', 'beam'):
      raise UserError(f"decode method={method!r} is unknown; use 'greedy', "
                      "'sample' or 'beam'.")
    if method == 'sample' and rng is None:
      raise UserError("method='sample' needs an rng; pass jax.random.key(seed).")
    start, positions, variables, extras, cache_length, length = self._prefill(
        params, batch, max_decode_length)
    cache = dict(extras, variables=set_cache_index(variables, positions),
                 positions=positions)

    def tokens_to_logits(tokens, cache, step):
      del step  # each row's position is in the cache
      extras = {k: v for k, v in cache.items()
                if k not in ('variables', 'positions')}
      logits, variables = self._cached_logits(
          params, cache['variables'], tokens, cache['positions'][:, None],
          extras, cache_length)
      new = dict(cache, variables=variables, positions=cache['positions'] + 1)
      return logits[:, -1].astype(jnp.float32), new

    options = dict(max_decode_len=length, eos_id=eos_id)
    if method == 'greedy':
      return decoding.greedy_search(tokens_to_logits, start, cache, **options)
    if method == 'sample':
      return decoding.temperature_sample(
          tokens_to_logits, start, cache, rng, temperature=temperature,
          top_k=top_k, top_p=top_p, **options)
    return decoding.beam_search(
        tokens_to_logits, start, cache, num_beams=num_beams, alpha=alpha,
        return_all_beams=return_all_beams, **options)

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None, *,
                    method: str = 'greedy',
                    max_decode_length: Optional[int] = None,
                    num_beams: int = 4, alpha: float = 0.6,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    eos_id: int = 1,
                    return_all_beams: bool = False) -> Tuple[Array, Array]:
    """(tokens [B, max_decode_length] int32, scores [B] float32) generated
    with a KV cache; jittable with the keyword options static.

    method 'greedy', 'sample' (temperature / top_k / top_p; needs `rng`) or
    'beam' (num_beams, length penalty alpha; `return_all_beams` gives
    [B, num_beams, L] tokens and [B, num_beams] scores, best first).
    Tokens are the continuation only, EOS (`eos_id`) included, 0 after it.
    Scores: the summed token log-probabilities (greedy, sample) or the
    length-normalised beam score (`decode` also returns raw log-probs).
    The batch format and `max_decode_length` default are the family's; see
    its `_prefill`.
    """
    out = self.decode(params, batch, rng, method=method,
                      max_decode_length=max_decode_length, num_beams=num_beams,
                      alpha=alpha, temperature=temperature, top_k=top_k,
                      top_p=top_p, eos_id=eos_id,
                      return_all_beams=return_all_beams)
    return out.tokens, out.scores
