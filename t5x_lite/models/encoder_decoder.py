"""T5.1.1 encoder-decoder: config, flax network and Model wrapper.

The network matches T5X's `t5_1_1` network and Hugging Face's
`T5ForConditionalGeneration(feed_forward_proj='gated-gelu')`: pre-norm
residual blocks with RMS norm, no biases, a bucketed relative position bias
per stack, gated-GELU MLPs, and a shared token embedding.

Parameter tree (T5X names; kernels are [in, out]):

  token_embedder/embedding                         [V, D]
  encoder/relpos_bias/rel_embedding                [N, buckets]
  encoder/layers_{i}/pre_attention_layer_norm/scale
  encoder/layers_{i}/attention/{query,key,value}/kernel   [D, N*H]
  encoder/layers_{i}/attention/out/kernel          [N*H, D]
  encoder/layers_{i}/pre_mlp_layer_norm/scale
  encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel        [D, F]
  encoder/layers_{i}/mlp/wo/kernel                 [F, D]
  encoder/encoder_norm/scale
  decoder/relpos_bias/rel_embedding
  decoder/layers_{i}/pre_self_attention_layer_norm/scale
  decoder/layers_{i}/self_attention/...            (as attention above)
  decoder/layers_{i}/pre_cross_attention_layer_norm/scale
  decoder/layers_{i}/encoder_decoder_attention/...
  decoder/layers_{i}/pre_mlp_layer_norm/scale
  decoder/layers_{i}/mlp/...
  decoder/decoder_norm/scale
  decoder/logits_dense/kernel                      [D, V]  (untied only)

With `scan_layers=True` the `layers_{i}` subtrees of a stack become one
`layers` subtree whose leaves have a leading [num_layers] axis ('layers');
see `common.run_layers` and `param_layout.stack_layers`.

Generation (`EncoderDecoderModel.predict_batch`, see `common.TokenLossModel`
and `t5x_lite.decoding`): the inputs are encoded once, then
`Transformer.cached_decode` runs one token per step from the start token 0
on a KV cache (flax 'cache' collection); the cross-attention keys / values
are computed on the first call and cached.
"""

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

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
class T5Config:
  """T5.1.1 hyperparameters (defaults: T5.1.1-small-like sizes)."""
  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 8
  head_dim: int = 64
  mlp_dim: int = 2048
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  dropout_rate: float = 0.0
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  mlp_activations: Sequence[str] = ('gelu', 'linear')
  logits_via_embedding: bool = False
  dtype: Any = 'float32'  # activations / compute
  param_dtype: Any = 'float32'
  scan_layers: bool = False  # see common.run_layers
  remat_policy: str = 'none'  # see common.REMAT_POLICIES

  def __post_init__(self):
    # Keep the config hashable when a list comes in (e.g. from gin).
    object.__setattr__(self, 'mlp_activations', tuple(self.mlp_activations))


def _dropout(cfg: T5Config, x: Array, deterministic: bool,
             broadcast: bool = True) -> Array:
  """T5X dropout: the mask is shared along the length axis by default."""
  dims = (-2,) if broadcast else ()
  return nn.Dropout(cfg.dropout_rate, broadcast_dims=dims)(
      x, deterministic=deterministic)


def _common(cfg: T5Config):
  return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)


def _attention(cfg: T5Config, name: str) -> layers.Attention:
  return layers.Attention(
      num_heads=cfg.num_heads, head_dim=cfg.head_dim,
      dropout_rate=cfg.dropout_rate, name=name, **_common(cfg))


def _mlp(cfg: T5Config) -> layers.GatedMlp:
  return layers.GatedMlp(
      mlp_dim=cfg.mlp_dim, activations=cfg.mlp_activations,
      dropout_rate=cfg.dropout_rate, name='mlp', **_common(cfg))


def _relpos(cfg: T5Config, bidirectional: bool) -> layers.RelativePositionBias:
  return layers.RelativePositionBias(
      num_heads=cfg.num_heads,
      num_buckets=cfg.relative_attention_num_buckets,
      max_distance=cfg.relative_attention_max_distance,
      bidirectional=bidirectional, name='relpos_bias', **_common(cfg))


class EncoderLayer(nn.Module):
  """Pre-norm self-attention block then MLP block."""
  config: T5Config

  @nn.compact
  def __call__(self, x, mask, position_bias, deterministic):
    cfg = self.config
    y = layers.RMSNorm(name='pre_attention_layer_norm', **_common(cfg))(x)
    y = _attention(cfg, 'attention')(y, y, mask, position_bias, deterministic)
    x = x + _dropout(cfg, y, deterministic)
    y = layers.RMSNorm(name='pre_mlp_layer_norm', **_common(cfg))(x)
    y = _mlp(cfg)(y, deterministic)
    x = x + _dropout(cfg, y, deterministic)
    return layers.constrain(x, ('batch', 'length', 'embed'))


class DecoderLayer(nn.Module):
  """Self-attention, cross-attention and MLP blocks, each pre-norm.

  `decode=True`: KV-cached (see `layers.Attention`'s `cache`).
  """
  config: T5Config
  decode: bool = False

  @nn.compact
  def __call__(self, x, encoded, self_mask, position_bias, cross_mask,
               deterministic):
    cfg = self.config
    y = layers.RMSNorm(name='pre_self_attention_layer_norm', **_common(cfg))(x)
    y = _attention(cfg, 'self_attention')(
        y, y, self_mask, position_bias, deterministic,
        cache='self' if self.decode else None)
    x = x + _dropout(cfg, y, deterministic)
    y = layers.RMSNorm(name='pre_cross_attention_layer_norm', **_common(cfg))(x)
    y = _attention(cfg, 'encoder_decoder_attention')(
        y, encoded, cross_mask, None, deterministic,
        cache='cross' if self.decode else None)
    x = x + _dropout(cfg, y, deterministic)
    y = layers.RMSNorm(name='pre_mlp_layer_norm', **_common(cfg))(x)
    y = _mlp(cfg)(y, deterministic)
    x = x + _dropout(cfg, y, deterministic)
    return layers.constrain(x, ('batch', 'length', 'embed'))


class Encoder(nn.Module):
  """Embedding -> encoder layers -> final norm."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens, mask, deterministic):
    cfg = self.config
    length = tokens.shape[-1]
    position_bias = _relpos(cfg, bidirectional=True)(length, length)
    x = self.shared_embedding(tokens)
    x = _dropout(cfg, x, deterministic)
    x = common.run_layers(EncoderLayer, cfg, cfg.num_encoder_layers, x,
                          mask, position_bias, deterministic)
    x = layers.RMSNorm(name='encoder_norm', **_common(cfg))(x)
    return _dropout(cfg, x, deterministic, broadcast=False)


class Decoder(nn.Module):
  """Embedding -> decoder layers -> final norm -> float32 logits."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, tokens, self_mask, cross_mask, deterministic,
               decoder_positions=None):
    """`decoder_positions` [B,T]: KV-cached decoding of tokens at those
    positions, attending to the cache slots of `self_mask` [B,1,T,C]."""
    cfg = self.config
    length = tokens.shape[-1]
    decode = decoder_positions is not None
    if decode:
      slots = self_mask.shape[-1]
      table = _relpos(cfg, bidirectional=False)(slots, slots)[0]  # [N,C,C]
      position_bias = jnp.moveaxis(
          jnp.take(table, decoder_positions, axis=1), 0, 1)  # [B,N,T,C]
    else:
      position_bias = _relpos(cfg, bidirectional=False)(length, length)
    y = self.shared_embedding(tokens)
    y = _dropout(cfg, y, deterministic)
    y = common.run_layers(DecoderLayer, cfg, cfg.num_decoder_layers, y,
                          encoded, self_mask, position_bias, cross_mask,
                          deterministic, decode=decode)
    y = layers.RMSNorm(name='decoder_norm', **_common(cfg))(y)
    y = _dropout(cfg, y, deterministic)
    if cfg.logits_via_embedding:
      logits = self.shared_embedding.attend(y) / np.sqrt(y.shape[-1])
    else:
      logits = layers.DenseGeneral(
          cfg.vocab_size, kernel_axes=('embed', 'vocab'), dtype=jnp.float32,
          param_dtype=cfg.param_dtype, name='logits_dense')(y)
    return layers.constrain(logits, ('batch', 'length', 'vocab'))


class Transformer(nn.Module):
  """The T5.1.1 encoder-decoder network.

  Masks follow T5X: padding is token id 0; decoder validity comes from
  `decoder_target_tokens > 0` (so BOS=0 inputs are fine); with segment ids,
  no attention crosses packed segments. `encoder_positions` and
  `decoder_positions` are accepted for feature-converter compatibility;
  the relative bias uses the row's arange, which is equivalent inside a
  segment (see `layers.RelativePositionBias`).
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(
        num_embeddings=cfg.vocab_size, features=cfg.emb_dim, **_common(cfg))
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens, encoder_segment_ids=None,
             enable_dropout: bool = False):
    """[B,L] tokens -> [B,L,D] encodings."""
    mask = layers.make_attention_mask(
        encoder_input_tokens, encoder_input_tokens,
        query_segment_ids=encoder_segment_ids, key_segment_ids=encoder_segment_ids)
    return self.encoder(encoder_input_tokens.astype(jnp.int32), mask,
                        not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens, encoder_segment_ids=None,
             decoder_segment_ids=None, enable_dropout: bool = False):
    """Teacher-forced decoder pass -> [B,T,V] float32 logits."""
    self_mask = layers.make_decoder_mask(
        decoder_target_tokens, decoder_segment_ids=decoder_segment_ids)
    cross_mask = cross_attention_mask(decoder_target_tokens > 0, encoder_input_tokens > 0,
                                      decoder_segment_ids, encoder_segment_ids)
    return self.decoder(encoded, decoder_input_tokens.astype(jnp.int32),
                        self_mask, cross_mask, not enable_dropout)

  def cached_decode(self, encoded, encoder_mask, decoder_input_tokens,
                    decoder_positions, cache_length: int):
    """KV-cached decoder pass -> [B,T,V] float32 logits.

    Tokens [B,T] sit at `decoder_positions` [B,T] and see the cache slots up
    to their own position (`cache_length` slots in all). `encoded` [B,S,D] is
    read on the first call only (cross-attention keys / values are cached;
    later calls may pass None); `encoder_mask` [B,S] marks real inputs.
    """
    tokens = decoder_input_tokens.astype(jnp.int32)
    self_mask = common.decode_self_mask(decoder_positions, cache_length)
    cross_mask = layers.make_attention_mask(None, encoder_mask)
    return self.decoder(encoded, tokens, self_mask, cross_mask, True,
                        decoder_positions)

  def __call__(self,
               encoder_input_tokens,
               decoder_input_tokens,
               decoder_target_tokens,
               encoder_segment_ids=None,
               decoder_segment_ids=None,
               encoder_positions=None,
               decoder_positions=None,
               *,
               enable_dropout: bool = False):
    del encoder_positions, decoder_positions  # see class docstring
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids,
                          enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids,
                       decoder_segment_ids, enable_dropout)


class EncoderDecoderModel(common.TokenLossModel):
  """Pure loss / logits / score functions over a T5 `Transformer`.

  Loss, metrics and normalisation: see `common.TokenLossModel` (z-loss 1e-4
  by default, as T5X).
  """
  NETWORK_CLS = Transformer
  NETWORK_FEATURES = ('encoder_input_tokens', 'decoder_input_tokens',
                      'decoder_target_tokens', 'encoder_segment_ids',
                      'decoder_segment_ids', 'encoder_positions',
                      'decoder_positions')
  REQUIRED_FEATURES = NETWORK_FEATURES[:3]
  FEATURE_CONVERTER_CLS = seqio.EncDecFeatureConverter

  def __init__(self,
               config: T5Config,
               z_loss: float = 1e-4,
               label_smoothing: float = 0.0,
               loss_normalizing_factor: Union[None, str, float] = None,
               feature_converter_cls: Any = None):
    super().__init__(config, z_loss, label_smoothing, loss_normalizing_factor,
                     feature_converter_cls)

  def _prefill(self, params, batch, max_decode_length):
    """Encodes `encoder_input_tokens` and caches the decoder's cross-attention.

    Decoding starts from token 0 (targets shifted right with 0, as trained);
    `max_decode_length` defaults to the length of `decoder_input_tokens`.
    """
    return prefill_encoder_decoder(
        self, params, batch, max_decode_length, start_id=0,
        encoder_mask=jnp.asarray(batch['encoder_input_tokens']) > 0,
        encode_kwargs={})

  def _cached_logits(self, params, variables, tokens, positions, extras,
                     cache_length):
    logits, new = self.module.apply(
        {'params': params, 'cache': variables}, None, extras['encoder_mask'],
        tokens, positions, cache_length, method='cached_decode',
        mutable=['cache'])
    return logits, new['cache']

  def dummy_batch(self, batch_size: int, input_length: int,
                  target_length: int) -> dict:
    """An int32 batch of ones with the EncDec feature names (for init)."""
    enc = np.ones((batch_size, input_length), np.int32)
    dec = np.ones((batch_size, target_length), np.int32)
    return dict(encoder_input_tokens=enc, decoder_input_tokens=dec,
                decoder_target_tokens=dec, decoder_loss_weights=dec)


def cross_attention_mask(decoder_valid: Array, encoder_valid: Array,
                         decoder_segment_ids: Optional[Array],
                         encoder_segment_ids: Optional[Array]) -> Array:
  """[B,1,T,S]: valid decoder positions see valid encoder positions of their
  own packed segment (T5 and BART)."""
  if encoder_segment_ids is None:
    return layers.make_attention_mask(decoder_valid, encoder_valid)
  if decoder_segment_ids is None:
    raise ValueError('Packed batches need both encoder_segment_ids and '
                     'decoder_segment_ids.')
  return layers.make_attention_mask(
      decoder_valid, encoder_valid, query_segment_ids=decoder_segment_ids,
      key_segment_ids=encoder_segment_ids)


def prefill_encoder_decoder(model: common.TokenLossModel, params, batch: Batch,
                            max_decode_length, *, start_id: int,
                            encoder_mask: Array,
                            encode_kwargs: Mapping[str, Any],
                            max_positions: Optional[int] = None):
  """The `_prefill` of the encoder-decoder families (T5, BART)."""
  if 'encoder_input_tokens' not in batch:
    raise UserError('Decoding an encoder-decoder model needs '
                    f'encoder_input_tokens; the batch has {sorted(batch)}.')
  if max_decode_length is None:
    if 'decoder_input_tokens' not in batch:
      raise UserError('Pass max_decode_length (or decoder_input_tokens, whose '
                      'length is the default).')
    max_decode_length = batch['decoder_input_tokens'].shape[1]
  if max_positions is not None and max_decode_length > max_positions:
    raise UserError(f'max_decode_length={max_decode_length} exceeds '
                    f'max_positions={max_positions}; lower it.')
  enc_tokens = jnp.asarray(batch['encoder_input_tokens'], jnp.int32)
  encoded = model.module.apply({'params': params}, enc_tokens, method='encode',
                               **encode_kwargs)
  size = enc_tokens.shape[0]
  start = jnp.full((size,), start_id, jnp.int32)
  positions = jnp.zeros((size,), jnp.int32)
  # One step at position 0 creates the cache; decoding then restarts there.
  _, variables = model.module.apply(
      {'params': params}, encoded, encoder_mask, start[:, None],
      positions[:, None], max_decode_length, method='cached_decode',
      mutable=['cache'])
  return (start, positions, variables['cache'],
          {'encoder_mask': encoder_mask}, max_decode_length, max_decode_length)
