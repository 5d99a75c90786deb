"""GPT decoder-only LM (GPT-2 architecture): config, network, Model wrapper.

The network matches Hugging Face's `GPT2LMHeadModel`: token + learned
absolute position embeddings, dropout, pre-LayerNorm blocks
(x += attn(ln(x)); x += mlp(ln(x))) with biased, 1/sqrt(head_dim)-scaled
causal attention and a GELU (tanh form) MLP, a final LayerNorm, and logits
tied to the token embedding (not rescaled).

Parameter tree (T5X decoder-only names; kernels are [in, out]):

  token_embedder/embedding                                [V, D] (vocab, embed)
  position_embedder/embedding                             [P, D] (abspos, embed)
  decoder/layers_{i}/pre_self_attention_layer_norm/{scale,bias}    [D] (embed)
  decoder/layers_{i}/self_attention/{query,key,value}/kernel       [D, N*H]
                                                  (embed, joined_kv), bias [N*H]
  decoder/layers_{i}/self_attention/out/kernel   [N*H, D] (joined_kv, embed),
                                                  bias [D]
  decoder/layers_{i}/pre_mlp_layer_norm/{scale,bias}
  decoder/layers_{i}/mlp/wi/kernel [D, F] (embed, mlp), bias [F]
  decoder/layers_{i}/mlp/wo/kernel [F, D] (mlp, embed), bias [D]
  decoder/decoder_norm/{scale,bias}

With `scan_layers=True` the `layers_{i}` subtrees of a stack become one
`layers` subtree whose leaves have a leading [num_layers] axis ('layers');
see `common.run_layers` and `param_layout.stack_layers`.

Batch features (what `seqio.DecoderFeatureConverter` emits, for LM tasks with
only 'targets' and prefix-LM tasks with 'inputs' and 'targets'), all [B,L]:

  decoder_input_tokens    targets shifted right (BOS = 0; 0 at each packed
                          segment start)
  decoder_target_tokens   the ids to predict; `> 0` marks real positions
  decoder_loss_weights    1 where the loss applies (prefix LM: the
                          continuation only)
  decoder_segment_ids     packed only: 1..k per example, 0 for padding
  decoder_positions       packed only: position inside the segment; used for
                          the learned position lookup (else 0..L-1)
  decoder_causal_attention  prefix LM only: 1 over the prefix (BOS + inputs);
                          attention is bidirectional inside it
  decoder_attention_mask  optional, 1 = real token; replaces
                          `decoder_target_tokens > 0` as the validity mask
                          (for inputs where id 0 is a real token, e.g. GPT-2's
                          '!')

Generation (`DecoderModel.predict_batch`, see `DecoderModel._prefill`): the
prompt runs through `GPTNetwork.cached_decode` once, filling a KV cache, then
one token per step, each row from its own prompt length.
"""

import dataclasses
from typing import Any, Mapping, Tuple

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from t5x_lite import layers
from t5x_lite.errors import UserError
from t5x_lite.models import common

Array = jax.Array
Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """GPT-2 hyperparameters (defaults: GPT-2 small, 124M parameters)."""
  vocab_size: int = 50257
  emb_dim: int = 768
  num_heads: int = 12
  head_dim: int = 64
  mlp_dim: int = 3072
  num_layers: int = 12
  max_positions: int = 1024
  dropout_rate: float = 0.1  # embedding and residual dropout
  attention_dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-5
  activation: str = 'gelu'  # tanh form = HF 'gelu_new'; 'gelu_exact'; 'relu'
  initializer_range: float = 0.02
  dtype: Any = 'float32'  # activations / compute
  param_dtype: Any = 'float32'
  scan_layers: bool = False  # see common.run_layers
  remat_policy: str = 'none'  # see common.REMAT_POLICIES


GPT2_SMALL = GPTConfig()
GPT2_MEDIUM = GPTConfig(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=4096,
                        num_layers=24)
GPT2_LARGE = GPTConfig(emb_dim=1280, num_heads=20, head_dim=64, mlp_dim=5120,
                       num_layers=36)
# A CPU-sized model; 8192 ids cover the embedded vocabulary (8000 + 100 extra).
GPT_TINY = GPTConfig(vocab_size=8192, emb_dim=128, num_heads=4, head_dim=32,
                     mlp_dim=512, num_layers=4, max_positions=512)
SIZES = {'tiny': GPT_TINY, 'small': GPT2_SMALL, 'medium': GPT2_MEDIUM,
         'large': GPT2_LARGE}


def _residual_init(cfg: GPTConfig):
  """GPT-2's init of the projections into the residual stream (attention out,
  MLP wo): std initializer_range / sqrt(2 * num_layers)."""
  return nn.initializers.normal(
      stddev=cfg.initializer_range / np.sqrt(2.0 * cfg.num_layers))


class DecoderLayer(nn.Module):
  """Pre-norm block: x += attn(ln(x)); x += mlp(ln(x)).

  `decode=True`: KV-cached self-attention (see `layers.Attention`).
  """
  config: GPTConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, mask, deterministic):
    cfg = self.config
    y = common.layer_norm(cfg, 'pre_self_attention_layer_norm')(x)
    y = common.attention(cfg, 'self_attention', out_kernel_init=_residual_init(cfg))(
        y, y, mask, deterministic=deterministic, cache='self' if self.decode else None)
    x = x + common.dropout(cfg, y, deterministic)
    y = common.layer_norm(cfg, 'pre_mlp_layer_norm')(x)
    y = common.mlp(cfg, out_kernel_init=_residual_init(cfg))(y)
    x = x + common.dropout(cfg, y, deterministic)
    return layers.constrain(x, ('batch', 'length', 'embed'))


class Decoder(nn.Module):
  """The stack of decoder layers and the final LayerNorm."""
  config: GPTConfig

  @nn.compact
  def __call__(self, x, mask, deterministic, decode: bool = False):
    x = common.run_layers(DecoderLayer, self.config, self.config.num_layers,
                          x, mask, deterministic, decode=decode)
    x = common.layer_norm(self.config, 'decoder_norm')(x)
    return layers.constrain(x, ('batch', 'length', 'embed'))


class GPTNetwork(nn.Module):
  """GPT-2 LM: `__call__` -> [B,L,V] float32 logits tied to the embedding;
  `hidden_states` -> the [B,L,D] final-LayerNorm outputs under them."""
  config: GPTConfig

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(
        num_embeddings=cfg.vocab_size, features=cfg.emb_dim,
        embedding_init=common.normal_init(cfg), **common.dtypes(cfg))
    self.position_embedder = layers.PositionEmbed(
        cfg.max_positions, cfg.emb_dim, embedding_init=common.normal_init(cfg),
        **common.dtypes(cfg))
    self.embedding_dropout = nn.Dropout(cfg.dropout_rate)
    self.decoder = Decoder(cfg)

  def __call__(self,
               decoder_input_tokens,
               decoder_target_tokens=None,
               decoder_segment_ids=None,
               decoder_positions=None,
               decoder_causal_attention=None,
               decoder_attention_mask=None,
               *,
               enable_dropout: bool = False) -> Array:
    """Teacher-forced [B,L,V] logits; see the module docstring for the features."""
    x = self.hidden_states(
        decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
        decoder_positions, decoder_causal_attention, decoder_attention_mask,
        enable_dropout=enable_dropout)
    return self.token_embedder.attend(x)

  def logits_and_hidden(self, *args, **kwargs) -> Tuple[Array, Array]:
    """(`__call__`'s logits, the `hidden_states` under them): one pass for
    a head beside the LM head (RL's value head)."""
    x = self.hidden_states(*args, **kwargs)
    return self.token_embedder.attend(x), x

  def cached_decode(self, decoder_input_tokens, decoder_positions,
                    cache_length: int, prefix_lengths=None) -> Array:
    """KV-cached pass -> [B,T,V] float32 logits.

    Tokens [B,T] sit at `decoder_positions` [B,T] and see the cache slots up
    to their own position (`cache_length` slots in all), and with
    `prefix_lengths` [B] every slot of the prompt (prefix LM).
    """
    tokens = decoder_input_tokens.astype(jnp.int32)
    x = self.token_embedder(tokens) + self.position_embedder(decoder_positions)
    x = layers.constrain(x, ('batch', 'length', 'embed'))
    mask = common.decode_self_mask(decoder_positions, cache_length,
                                   prefix_lengths)
    x = self.decoder(x, mask, True, decode=True)
    return self.token_embedder.attend(x)

  def hidden_states(self,
                    decoder_input_tokens,
                    decoder_target_tokens=None,
                    decoder_segment_ids=None,
                    decoder_positions=None,
                    decoder_causal_attention=None,
                    decoder_attention_mask=None,
                    *,
                    enable_dropout: bool = False) -> Array:
    """Teacher-forced [B,L,D] outputs of the final LayerNorm."""
    cfg = self.config
    tokens = decoder_input_tokens.astype(jnp.int32)
    length = tokens.shape[-1]
    if length > cfg.max_positions:
      raise ValueError(f'Sequence length {length} exceeds max_positions='
                       f'{cfg.max_positions}; shorten the feature lengths or '
                       'raise GPTConfig.max_positions.')
    if decoder_attention_mask is not None:
      valid = decoder_attention_mask
    elif decoder_target_tokens is not None:
      valid = decoder_target_tokens
    else:
      raise ValueError('The decoder needs decoder_target_tokens or '
                       'decoder_attention_mask to know the real positions.')
    if decoder_positions is None:
      decoder_positions = jnp.arange(length)
    positions = jnp.broadcast_to(decoder_positions, tokens.shape)
    x = self.token_embedder(tokens) + self.position_embedder(positions)
    x = self.embedding_dropout(x, deterministic=not enable_dropout)
    x = layers.constrain(x, ('batch', 'length', 'embed'))
    # `valid > 0` is all make_decoder_mask reads from its first argument.
    mask = layers.make_decoder_mask(valid, decoder_causal_attention,
                                    decoder_segment_ids)
    return self.decoder(x, mask, not enable_dropout)


class DecoderModel(common.TokenLossModel):
  """Pure loss / logits / score functions over a `GPTNetwork` (LM, prefix LM).

  Loss, metrics and normalisation: see `common.TokenLossModel`.
  """
  NETWORK_CLS = GPTNetwork
  NETWORK_FEATURES = ('decoder_input_tokens', 'decoder_target_tokens',
                      'decoder_segment_ids', 'decoder_positions',
                      'decoder_causal_attention', 'decoder_attention_mask')
  REQUIRED_FEATURES = ('decoder_input_tokens',)
  FEATURE_CONVERTER_CLS = seqio.DecoderFeatureConverter
  DECODER_ONLY = True

  def _prefill(self, params, batch, max_decode_length):
    """Runs the prompt through the network once, filling the KV cache.

    The prompt is what `seqio.DecoderFeatureConverter` gives for a prefix-LM
    example with empty targets (as T5X's DecoderOnlyModel decodes):
    `decoder_input_tokens` [B,P] = BOS 0, the prompt, then 0s, with
    `decoder_causal_attention` 1 over BOS and the prompt (attention is
    bidirectional there). Instead of it a batch may give
    `decoder_prompt_lengths` [B], the number of prompt tokens after BOS
    (causal attention throughout). No prompt at all: decoding starts from
    BOS. Each row continues from its own prompt: its last prompt token is
    fed at step 0 at its own position, so rows of any prompt length share a
    batch. `max_decode_length` defaults to P; P + max_decode_length - 1
    positions must fit in `max_positions`.
    """
    cfg = self.config
    tokens = jnp.asarray(batch['decoder_input_tokens'], jnp.int32)
    size, prompt_buffer = tokens.shape
    prefix_lengths = None
    if 'decoder_causal_attention' in batch:
      prefix_lengths = jnp.sum(
          jnp.asarray(batch['decoder_causal_attention']) > 0, axis=1)
      last = jnp.maximum(prefix_lengths - 1, 0)
    elif 'decoder_prompt_lengths' in batch:
      last = jnp.asarray(batch['decoder_prompt_lengths'], jnp.int32)
    else:
      last = jnp.zeros((size,), jnp.int32)
    last = last.astype(jnp.int32)
    length = max_decode_length or prompt_buffer
    cache_length = prompt_buffer + length - 1
    if cache_length > cfg.max_positions:
      raise UserError(
          f'Prompt length {prompt_buffer} + max_decode_length {length} - 1 '
          f'exceeds max_positions={cfg.max_positions}; shorten the prompt '
          'feature length or lower max_decode_length.')
    positions = jnp.broadcast_to(jnp.arange(prompt_buffer), tokens.shape)
    _, variables = self.module.apply(
        {'params': params}, tokens, positions, cache_length, prefix_lengths,
        method='cached_decode', mutable=['cache'])
    start = jnp.take_along_axis(tokens, last[:, None], axis=1)[:, 0]
    return start, last, variables['cache'], {}, cache_length, length

  def _cached_logits(self, params, variables, tokens, positions, extras,
                     cache_length):
    del extras
    logits, new = self.module.apply(
        {'params': params, 'cache': variables}, tokens, positions,
        cache_length, method='cached_decode', mutable=['cache'])
    return logits, new['cache']

  def dummy_batch(self, batch_size: int, length: int) -> dict:
    """An int32 batch of ones with the LM feature names (for init / shapes)."""
    ones = np.ones((batch_size, length), np.int32)
    return dict(decoder_input_tokens=ones, decoder_target_tokens=ones,
                decoder_loss_weights=ones)

