"""BART encoder-decoder: config, flax network and Model wrapper.

The network matches Hugging Face's `BartForConditionalGeneration`: a token
embedding shared by both stacks and the tied LM head (plus a
`final_logits_bias`), learned absolute positions per stack (looked up at
`position + position_offset`), a LayerNorm after the embeddings of each stack,
post-LayerNorm blocks with biased, 1/sqrt(head_dim)-scaled attention and a
biased MLP (exact GELU by default), and no final layer norm.

Parameter tree (kernels are [in, out]; D emb_dim, V vocab, F mlp_dim,
N*H heads * head_dim, P max_positions + position_offset):

  token_embedder/embedding                              [V, D]  (vocab, embed)
  final_logits_bias                                     [V]     (vocab)
  encoder/position_embedder/embedding                   [P, D]  (abspos, embed)
  encoder/embedding_norm/{scale,bias}                   [D]     (embed)
  encoder/layers_{i}/attention/{query,key,value}/kernel [D, N*H], bias [N*H]
  encoder/layers_{i}/attention/out/kernel               [N*H, D], bias [D]
  encoder/layers_{i}/post_attention_layer_norm/{scale,bias}
  encoder/layers_{i}/mlp/wi/kernel [D, F], bias [F]
  encoder/layers_{i}/mlp/wo/kernel [F, D], bias [D]
  encoder/layers_{i}/post_mlp_layer_norm/{scale,bias}
  decoder/position_embedder/embedding                   [P, D]
  decoder/embedding_norm/{scale,bias}
  decoder/layers_{i}/self_attention/...                 (as attention above)
  decoder/layers_{i}/post_self_attention_layer_norm/{scale,bias}
  decoder/layers_{i}/encoder_decoder_attention/...
  decoder/layers_{i}/post_cross_attention_layer_norm/{scale,bias}
  decoder/layers_{i}/mlp/...
  decoder/layers_{i}/post_mlp_layer_norm/{scale,bias}

With `scan_layers=True` the `layers_{i}` subtrees of a stack become one
`layers` subtree whose leaves have a leading [num_layers] axis ('layers');
see `common.run_layers` and `param_layout.stack_layers`.

Batch features are those of `seqio.EncDecFeatureConverter`:
`encoder_input_tokens` [B,S], `decoder_input_tokens`, `decoder_target_tokens`,
`decoder_loss_weights` [B,T]; when packed also `encoder_segment_ids`,
`decoder_segment_ids`, `encoder_positions`, `decoder_positions` (positions
restart at 0 in each segment and index the learned tables). Optional
`encoder_attention_mask` [B,S] and `decoder_attention_mask` [B,T] (1 = real
token) override the padding masks derived from `pad_id`.

Generation (`BartModel.predict_batch`): as T5's (see `encoder_decoder`), from
`BartConfig.decoder_start_id` (0, the start token of the shifted-right
targets our pipelines train with; Hugging Face's BART uses 2).
"""

import dataclasses
from typing import Any, Mapping, Optional

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from t5x_lite import layers
from t5x_lite.models import common
from t5x_lite.models import encoder_decoder

Array = jax.Array
Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class BartConfig:
  """BART hyperparameters (defaults: bart-base, GPT-2 BPE vocabulary).

  `pad_id` is 0 for the seqio pipelines of this project; checkpoints from
  Hugging Face use 1 (`config_from_hf` sets it from `pad_token_id`).
  """
  vocab_size: int = 50265
  emb_dim: int = 768
  num_heads: int = 12
  head_dim: int = 64
  mlp_dim: int = 3072
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  max_positions: int = 1024
  position_offset: int = 2  # HF's table has max_positions + 2 rows
  pad_id: int = 0
  decoder_start_id: int = 0  # first decoder input when generating (HF: 2)
  scale_embedding: bool = False  # True: token embeddings * sqrt(emb_dim)
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  activation_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  activation: str = 'gelu_exact'  # HF 'gelu'; 'gelu' here is the tanh form
  initializer_range: float = 0.02
  dtype: Any = 'float32'  # activations / compute
  param_dtype: Any = 'float32'
  scan_layers: bool = False  # see common.run_layers
  remat_policy: str = 'none'  # see common.REMAT_POLICIES


BART_BASE = BartConfig()
BART_LARGE = BartConfig(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=4096,
                        num_encoder_layers=12, num_decoder_layers=12)
# A CPU-sized model; 8192 ids cover the embedded SentencePiece vocabulary
# (8000 pieces + 100 sentinels).
BART_TINY = BartConfig(vocab_size=8192, emb_dim=128, num_heads=4, head_dim=32,
                       mlp_dim=512, num_encoder_layers=2, num_decoder_layers=2,
                       max_positions=512)
SIZES = {'tiny': BART_TINY, 'base': BART_BASE, 'large': BART_LARGE}


class DecoderLayer(nn.Module):
  """Self-attention, cross-attention and MLP, each + residual then LN.

  `decode=True`: KV-cached (see `layers.Attention`'s `cache`).
  """
  config: BartConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, encoded, self_mask, cross_mask, deterministic):
    cfg = self.config
    y = common.attention(cfg, 'self_attention')(
        x, x, self_mask, deterministic=deterministic,
        cache='self' if self.decode else None)
    x = common.post_norm(cfg, 'post_self_attention_layer_norm', x, y, deterministic)
    y = common.attention(cfg, 'encoder_decoder_attention')(
        x, encoded, cross_mask, deterministic=deterministic,
        cache='cross' if self.decode else None)
    x = common.post_norm(cfg, 'post_cross_attention_layer_norm', x, y, deterministic)
    y = common.mlp(cfg)(x, deterministic)
    x = common.post_norm(cfg, 'post_mlp_layer_norm', x, y, deterministic)
    return layers.constrain(x, ('batch', 'length', 'embed'))


def _embed(cfg: BartConfig, shared_embedding: layers.Embed, tokens: Array,
           positions: Array, deterministic: bool) -> Array:
  """Token embedding (optionally scaled) + this stack's positions, LN, dropout.

  Called inside a stack's compact `__call__`, so `position_embedder` and
  `embedding_norm` are params of that stack.
  """
  x = shared_embedding(tokens)
  if cfg.scale_embedding:
    x = x * jnp.asarray(np.sqrt(cfg.emb_dim), x.dtype)
  x = x + layers.PositionEmbed(
      cfg.max_positions + cfg.position_offset, cfg.emb_dim,
      embedding_init=common.normal_init(cfg), name='position_embedder',
      **common.dtypes(cfg))(positions + cfg.position_offset)
  x = common.layer_norm(cfg, 'embedding_norm')(x)
  x = common.dropout(cfg, x, deterministic)
  return layers.constrain(x, ('batch', 'length', 'embed'))


class Encoder(nn.Module):
  """Embeddings -> encoder layers: [B,S] tokens -> [B,S,D]."""
  config: BartConfig
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens, positions, mask, deterministic):
    cfg = self.config
    x = _embed(cfg, self.shared_embedding, tokens, positions, deterministic)
    return common.run_layers(common.PostNormEncoderLayer, cfg,
                             cfg.num_encoder_layers, x, mask, deterministic)


class Decoder(nn.Module):
  """Embeddings -> decoder layers: [B,T] tokens, [B,S,D] encoded -> [B,T,D]."""
  config: BartConfig
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, tokens, positions, self_mask, cross_mask,
               deterministic, decode: bool = False):
    cfg = self.config
    y = _embed(cfg, self.shared_embedding, tokens, positions, deterministic)
    return common.run_layers(DecoderLayer, cfg, cfg.num_decoder_layers, y,
                             encoded, self_mask, cross_mask, deterministic,
                             decode=decode)


def _positions(tokens: Array, positions: Optional[Array],
               cfg: BartConfig) -> Array:
  """[B,L] positions: the given (packed) ones, else 0..L-1 in every row."""
  length = tokens.shape[-1]
  if length > cfg.max_positions:
    raise ValueError(f'Sequence length {length} exceeds max_positions='
                     f'{cfg.max_positions}; truncate the features or raise '
                     'BartConfig.max_positions.')
  if positions is None:
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
  return jnp.asarray(positions, jnp.int32)


class BartNetwork(nn.Module):
  """The BART encoder-decoder; `__call__` -> [B,T,V] float32 logits.

  Masks: encoder validity is `encoder_attention_mask` or
  `encoder_input_tokens != pad_id`; decoder validity is
  `decoder_attention_mask` or `decoder_target_tokens != pad_id` (T5X's
  convention, so a start token equal to pad_id in the decoder inputs is not
  masked). Decoder self-attention is causal; with segment ids no attention
  crosses packed segments. Padded queries get (ignored) outputs.
  """
  config: BartConfig

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(
        num_embeddings=cfg.vocab_size, features=cfg.emb_dim,
        embedding_init=common.normal_init(cfg), **common.dtypes(cfg))
    self.final_logits_bias = self.param(
        'final_logits_bias',
        nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
        (cfg.vocab_size,), layers.canonicalize_dtype(cfg.param_dtype))
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def _encoder_valid(self, encoder_input_tokens, encoder_attention_mask):
    if encoder_attention_mask is not None:
      return jnp.asarray(encoder_attention_mask) > 0
    return encoder_input_tokens != self.config.pad_id

  def encode(self, encoder_input_tokens, encoder_segment_ids=None,
             encoder_positions=None, encoder_attention_mask=None,
             enable_dropout: bool = False) -> Array:
    """[B,S] tokens -> [B,S,D] encodings."""
    cfg = self.config
    tokens = encoder_input_tokens.astype(jnp.int32)
    valid = self._encoder_valid(tokens, encoder_attention_mask)
    mask = layers.make_attention_mask(valid, valid, query_segment_ids=encoder_segment_ids,
                                      key_segment_ids=encoder_segment_ids)
    positions = _positions(tokens, encoder_positions, cfg)
    return self.encoder(tokens, positions, mask, not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens, encoder_segment_ids=None,
             decoder_segment_ids=None, decoder_positions=None,
             encoder_attention_mask=None, decoder_attention_mask=None,
             enable_dropout: bool = False) -> Array:
    """Teacher-forced decoder pass -> [B,T,V] float32 logits."""
    cfg = self.config
    tokens = decoder_input_tokens.astype(jnp.int32)
    if decoder_attention_mask is not None:
      dec_valid = jnp.asarray(decoder_attention_mask) > 0
    else:
      dec_valid = decoder_target_tokens != cfg.pad_id
    enc_valid = self._encoder_valid(encoder_input_tokens,
                                    encoder_attention_mask)
    self_mask = layers.make_decoder_mask(dec_valid, decoder_segment_ids=decoder_segment_ids)
    cross_mask = encoder_decoder.cross_attention_mask(
        dec_valid, enc_valid, decoder_segment_ids, encoder_segment_ids)
    positions = _positions(tokens, decoder_positions, cfg)
    y = self.decoder(encoded, tokens, positions, self_mask, cross_mask,
                     not enable_dropout)
    logits = (self.token_embedder.attend(y) +
              self.final_logits_bias.astype(jnp.float32))
    return layers.constrain(logits, ('batch', 'length', 'vocab'))

  def cached_decode(self, encoded, encoder_mask, decoder_input_tokens,
                    decoder_positions, cache_length: int) -> Array:
    """KV-cached decoder pass -> [B,T,V] float32 logits.

    As `encoder_decoder.Transformer.cached_decode`: tokens [B,T] at
    `decoder_positions` [B,T] see the cache slots up to their own position;
    `encoded` is read on the first call only; `encoder_mask` [B,S].
    """
    tokens = decoder_input_tokens.astype(jnp.int32)
    self_mask = common.decode_self_mask(decoder_positions, cache_length)
    cross_mask = layers.make_attention_mask(None, encoder_mask)
    y = self.decoder(encoded, tokens, decoder_positions, self_mask, cross_mask,
                     True, decode=True)
    logits = (self.token_embedder.attend(y) +
              self.final_logits_bias.astype(jnp.float32))
    return layers.constrain(logits, ('batch', 'length', 'vocab'))

  def __call__(self,
               encoder_input_tokens,
               decoder_input_tokens,
               decoder_target_tokens,
               encoder_segment_ids=None,
               decoder_segment_ids=None,
               encoder_positions=None,
               decoder_positions=None,
               encoder_attention_mask=None,
               decoder_attention_mask=None,
               *,
               enable_dropout: bool = False) -> Array:
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids,
                          encoder_positions, encoder_attention_mask,
                          enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids,
                       decoder_segment_ids, decoder_positions,
                       encoder_attention_mask, decoder_attention_mask,
                       enable_dropout)


class BartModel(common.TokenLossModel):
  """Pure loss / logits / score functions over a `BartNetwork`.

  Loss, metrics and normalisation: see `common.TokenLossModel`; without
  `decoder_loss_weights` the weights are `decoder_target_tokens != pad_id`.
  """
  NETWORK_CLS = BartNetwork
  NETWORK_FEATURES = encoder_decoder.EncoderDecoderModel.NETWORK_FEATURES + (
      'encoder_attention_mask', 'decoder_attention_mask')
  REQUIRED_FEATURES = encoder_decoder.EncoderDecoderModel.REQUIRED_FEATURES
  FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter
  dummy_batch = encoder_decoder.EncoderDecoderModel.dummy_batch

  def _prefill(self, params, batch, max_decode_length):
    """Encodes `encoder_input_tokens` (real where `encoder_attention_mask`,
    else != pad_id) and caches the decoder's cross-attention.

    Decoding starts from `config.decoder_start_id`: 0 by default, the
    shifted-right start token our pipelines train with (Hugging Face
    checkpoints use 2). `max_decode_length` defaults to the length of
    `decoder_input_tokens` and must be <= max_positions.
    """
    cfg = self.config
    mask = batch.get('encoder_attention_mask')
    if mask is None:
      mask = jnp.asarray(batch['encoder_input_tokens']) != cfg.pad_id
    mask = jnp.asarray(mask) > 0
    return encoder_decoder.prefill_encoder_decoder(
        self, params, batch, max_decode_length, start_id=cfg.decoder_start_id,
        encoder_mask=mask, encode_kwargs=dict(encoder_attention_mask=mask),
        max_positions=cfg.max_positions)

  _cached_logits = encoder_decoder.EncoderDecoderModel._cached_logits
