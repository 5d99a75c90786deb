"""Llama-style decoder-only LM (Llama 2/3, Mistral, Qwen2): config, network, Model.

The network matches Hugging Face's `LlamaForCausalLM` (and `MistralForCausalLM`,
`Qwen2ForCausalLM`): a token embedding, pre-RMSNorm blocks
(x += attn(norm(x)); x += mlp(norm(x))) whose attention rotates queries and
keys by their positions (RoPE, `t5x_lite.rotary`) and shares each key / value
head among num_heads / num_kv_heads query heads (grouped-query attention), a
SwiGLU MLP (silu(x W_gate) * (x W_up)) W_down, a final RMSNorm, and logits
from the embedding (tied) or from their own [D, V] kernel. Qwen2 adds biases
to the query, key and value projections; Mistral limits attention to a
sliding window of the last `sliding_window` positions.

Parameter tree (T5X decoder-only names; kernels are [in, out]):

  token_embedder/embedding                           [V, D] (vocab, embed)
  decoder/layers_{i}/pre_self_attention_layer_norm/scale          [D] (embed)
  decoder/layers_{i}/self_attention/query/kernel  [D, N*H] (embed, joined_kv)
  decoder/layers_{i}/self_attention/{key,value}/kernel
                                           [D, K, H] (embed, kv_heads, kv)
  decoder/layers_{i}/self_attention/{query,key,value}/bias
                                  [N*H] / [K, H] (qkv_bias only, Qwen2)
  decoder/layers_{i}/self_attention/out/kernel    [N*H, D] (joined_kv, embed)
  decoder/layers_{i}/pre_mlp_layer_norm/scale
  decoder/layers_{i}/mlp/{wi_0,wi_1}/kernel [D, F] (embed, mlp): gate, up
  decoder/layers_{i}/mlp/wo/kernel          [F, D] (mlp, embed): down
  decoder/decoder_norm/scale
  logits_dense/kernel                      [D, V] (embed, vocab), untied only

With `scan_layers=True` the `layers_{i}` subtrees become one `layers` subtree
stacked on a leading [num_layers] axis (see `common.run_layers`).

Batch features are the GPT family's (see `models.decoder`): LM and prefix-LM
features of `seqio.DecoderFeatureConverter`, packed or not. RoPE reads
`decoder_positions` when packed, so positions restart in every segment.
Generation (`LlamaModel.predict_batch`) fills a KV cache of num_kv_heads
heads with the prompt, then decodes one token per step, each row from its own
prompt length (as `DecoderModel` does).
"""

import dataclasses
from typing import Any, ClassVar, Mapping, Optional, Tuple, Union

from flax import linen as nn
import jax
import jax.numpy as jnp

from t5x_lite import layers
from t5x_lite.errors import UserError
from t5x_lite.models import common
from t5x_lite.models import decoder
from t5x_lite.rotary import RopeScaling

Array = jax.Array
Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Llama-family hyperparameters (defaults: configs/models/llama_tiny.gin's).

  `rope_scaling` is None or Llama 3's scaling, given as a `RopeScaling` or a
  dict of its fields (e.g. from gin). `sliding_window` None attends to every
  earlier position. `max_positions` is the context the model was trained for
  (HF's max_position_embeddings); RoPE itself has no table to outgrow.
  """
  vocab_size: int = 8192
  emb_dim: int = 128
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 432
  num_layers: int = 4
  rope_theta: float = 10000.0
  rope_scaling: Optional[Union[RopeScaling, Mapping[str, Any]]] = None
  rms_norm_eps: float = 1e-5
  qkv_bias: bool = False  # Qwen2
  sliding_window: Optional[int] = None  # Mistral
  tie_word_embeddings: bool = True
  max_positions: int = 512
  dropout_rate: float = 0.0  # embedding and residual dropout
  attention_dropout_rate: float = 0.0
  initializer_range: float = 0.02
  dtype: Any = 'float32'  # activations / compute
  param_dtype: Any = 'float32'
  scan_layers: bool = False  # see common.run_layers
  remat_policy: str = 'none'  # see common.REMAT_POLICIES
  # The SwiGLU MLP's input projections (what FLOP counts read; not a setting).
  mlp_activations: ClassVar[Tuple[str, ...]] = ('silu', 'linear')

  def __post_init__(self):
    if isinstance(self.rope_scaling, Mapping):
      scaling = dict(self.rope_scaling)
      kind = scaling.pop('rope_type', 'llama3')
      if kind != 'llama3':
        raise UserError(f"LlamaConfig.rope_scaling has rope_type={kind!r}; only Llama 3's "
                        "('llama3') scaling is supported.")
      fields = {f.name for f in dataclasses.fields(RopeScaling)}
      unknown = sorted(set(scaling) - fields)
      if unknown:
        raise UserError(f'LlamaConfig.rope_scaling has unknown keys {unknown}; '
                        f'use {sorted(fields)}.')
      object.__setattr__(self, 'rope_scaling', RopeScaling(**scaling))
    if self.num_heads % self.num_kv_heads:
      raise UserError(f'LlamaConfig: num_heads={self.num_heads} is not a multiple '
                      f'of num_kv_heads={self.num_kv_heads}; choose a divisor.')
    if self.head_dim % 2:
      raise UserError(f'LlamaConfig: head_dim={self.head_dim} must be even for RoPE.')


def _init(cfg: LlamaConfig):
  return nn.initializers.normal(stddev=cfg.initializer_range)


class LlamaLayer(nn.Module):
  """Pre-norm block: x += attn(rmsnorm(x)); x += swiglu(rmsnorm(x))."""
  config: LlamaConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, mask, positions, deterministic):
    cfg = self.config
    norm = lambda name: layers.RMSNorm(cfg.rms_norm_eps, name=name, **common.dtypes(cfg))
    y = norm('pre_self_attention_layer_norm')(x)
    y = layers.Attention(
        num_heads=cfg.num_heads, head_dim=cfg.head_dim, num_kv_heads=cfg.num_kv_heads,
        rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
        use_bias=cfg.qkv_bias, out_bias=False, scale_logits=True,
        dropout_rate=cfg.attention_dropout_rate, dropout_broadcast_dims=(),
        kernel_init=_init(cfg), name='self_attention', **common.dtypes(cfg))(
            y, y, mask, deterministic=deterministic,
            cache='self' if self.decode else None, positions=positions)
    x = x + common.dropout(cfg, y, deterministic)
    y = norm('pre_mlp_layer_norm')(x)
    y = layers.GatedMlp(cfg.mlp_dim, activations=cfg.mlp_activations,
                        kernel_init=_init(cfg), name='mlp', **common.dtypes(cfg))(y)
    x = x + common.dropout(cfg, y, deterministic)
    return layers.constrain(x, ('batch', 'length', 'embed'))


class LlamaDecoder(nn.Module):
  """The stack of layers and the final RMSNorm."""
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, mask, positions, deterministic, decode: bool = False):
    cfg = self.config
    x = common.run_layers(LlamaLayer, cfg, cfg.num_layers, x, mask, positions,
                          deterministic, decode=decode)
    x = layers.RMSNorm(cfg.rms_norm_eps, name='decoder_norm', **common.dtypes(cfg))(x)
    return layers.constrain(x, ('batch', 'length', 'embed'))


class LlamaNetwork(nn.Module):
  """Llama LM: `__call__` -> [B,L,V] float32 logits; `hidden_states` -> the
  [B,L,D] final-RMSNorm outputs under them; `cached_decode` for generation."""
  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(
        num_embeddings=cfg.vocab_size, features=cfg.emb_dim,
        embedding_init=_init(cfg), **common.dtypes(cfg))
    self.embedding_dropout = nn.Dropout(cfg.dropout_rate)
    self.decoder = LlamaDecoder(cfg)
    if not cfg.tie_word_embeddings:
      self.logits_dense = layers.DenseGeneral(
          cfg.vocab_size, kernel_axes=('embed', 'vocab'), kernel_init=_init(cfg),
          dtype='float32', param_dtype=cfg.param_dtype)

  def _logits(self, x: Array) -> Array:
    if self.config.tie_word_embeddings:
      return self.token_embedder.attend(x)
    logits = self.logits_dense(x.astype(jnp.float32))
    return layers.constrain(logits, ('batch', 'length', 'vocab'))

  def __call__(self,
               decoder_input_tokens,
               decoder_target_tokens=None,
               decoder_segment_ids=None,
               decoder_positions=None,
               decoder_causal_attention=None,
               decoder_attention_mask=None,
               *,
               enable_dropout: bool = False) -> Array:
    """Teacher-forced [B,L,V] logits; see `models.decoder` for the features."""
    x = self.hidden_states(
        decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
        decoder_positions, decoder_causal_attention, decoder_attention_mask,
        enable_dropout=enable_dropout)
    return self._logits(x)

  def logits_and_hidden(self, *args, **kwargs) -> Tuple[Array, Array]:
    """(`__call__`'s logits, the `hidden_states` under them)."""
    x = self.hidden_states(*args, **kwargs)
    return self._logits(x), x

  def hidden_states(self,
                    decoder_input_tokens,
                    decoder_target_tokens=None,
                    decoder_segment_ids=None,
                    decoder_positions=None,
                    decoder_causal_attention=None,
                    decoder_attention_mask=None,
                    *,
                    enable_dropout: bool = False) -> Array:
    """Teacher-forced [B,L,D] outputs of the final RMSNorm."""
    cfg = self.config
    tokens = decoder_input_tokens.astype(jnp.int32)
    if decoder_attention_mask is not None:
      valid = decoder_attention_mask
    elif decoder_target_tokens is not None:
      valid = decoder_target_tokens
    else:
      raise ValueError('The decoder needs decoder_target_tokens or '
                       'decoder_attention_mask to know the real positions.')
    if decoder_positions is None:
      decoder_positions = jnp.arange(tokens.shape[-1])
    positions = jnp.broadcast_to(decoder_positions, tokens.shape)
    x = self.token_embedder(tokens)
    x = self.embedding_dropout(x, deterministic=not enable_dropout)
    # Causality and the window compare plain row offsets; inside a packed
    # segment they differ from its positions by a constant.
    mask = layers.make_decoder_mask(valid, decoder_causal_attention,
                                    decoder_segment_ids, cfg.sliding_window)
    return self.decoder(x, mask, positions, not enable_dropout)

  def cached_decode(self, decoder_input_tokens, decoder_positions,
                    cache_length: int, prefix_lengths=None) -> Array:
    """KV-cached pass -> [B,T,V] float32 logits (as `GPTNetwork.cached_decode`).

    Tokens [B,T] at `decoder_positions` [B,T] see the cache slots up to their
    own position (within the sliding window), and with `prefix_lengths` [B]
    every slot of the prompt.
    """
    tokens = decoder_input_tokens.astype(jnp.int32)
    x = self.token_embedder(tokens)
    slots = jnp.arange(cache_length)[None]
    prefix = None if prefix_lengths is None else slots < prefix_lengths[:, None]
    mask = layers.make_attention_mask(
        None, None, causal=True, query_positions=decoder_positions, key_positions=slots,
        key_prefix=prefix, sliding_window=self.config.sliding_window)
    x = self.decoder(x, mask, decoder_positions, True, decode=True)
    return self._logits(x)


class LlamaModel(common.TokenLossModel):
  """Pure loss / logits / score / decoding functions over a `LlamaNetwork`.

  The GPT family's Model (LM, prefix LM, packing, KV-cached generation; see
  `decoder.DecoderModel`, whose methods it shares) over the Llama network. A
  prompt plus the decoded tokens must fit in `max_positions`. Not a subclass
  of DecoderModel, so that code choosing by family (HF export) tells them apart.
  """
  NETWORK_CLS = LlamaNetwork
  NETWORK_FEATURES = decoder.DecoderModel.NETWORK_FEATURES
  REQUIRED_FEATURES = decoder.DecoderModel.REQUIRED_FEATURES
  FEATURE_CONVERTER_CLS = decoder.DecoderModel.FEATURE_CONVERTER_CLS
  DECODER_ONLY = True

  _prefill = decoder.DecoderModel._prefill
  _cached_logits = decoder.DecoderModel._cached_logits
  dummy_batch = decoder.DecoderModel.dummy_batch

