"""BERT encoder: config, flax network and Model wrapper (MLM + NSP).

The network matches Hugging Face's `BertForPreTraining` (hidden_act='gelu'):
token + token-type + learned absolute position embeddings, a LayerNorm,
post-LayerNorm blocks (biased, 1/sqrt(head_dim)-scaled attention; MLP with
exact GELU), a tanh pooler on [CLS], an MLM head tied to the token embedding
(plus an output bias) and a 2-way next-sentence head on the pooled output.

Parameter tree (kernels are [in, out]):

  token_embedder/embedding                              [V, D]  (vocab, embed)
  position_embedder/embedding                           [P, D]  (abspos, embed)
  segment_embedder/embedding                            [2, D]  (abspos, embed)
  embedding_norm/{scale,bias}                           [D]
  encoder/layers_{i}/attention/{query,key,value}/kernel [D, N*H], bias [N*H]
  encoder/layers_{i}/attention/out/kernel               [N*H, D], bias [D]
  encoder/layers_{i}/post_attention_layer_norm/{scale,bias}
  encoder/layers_{i}/mlp/wi/kernel [D, F], bias [F]; mlp/wo/kernel [F, D], bias [D]
  encoder/layers_{i}/post_mlp_layer_norm/{scale,bias}
  pooler/{kernel [D, D], bias}                          (embed, mlp)
  mlm_head/transform/{kernel [D, D], bias}              (embed, mlp)
  mlm_head/layer_norm/{scale,bias}
  mlm_head/output_bias                                  [V]     (vocab)
  nsp_head/{kernel [D, 2], bias [2]}                    (embed, None)

The two NSP classes are the one unnamed (replicated) axis.

Sequence classification / regression (GLUE) reuses this network without the
pretraining heads, plus a `classifier` head on the pooled output:
`models.classification.BertClassificationModel`.

With `scan_layers=True` the `layers_{i}` subtrees of a stack become one
`layers` subtree whose leaves have a leading [num_layers] axis ('layers');
see `common.run_layers` and `param_layout.stack_layers`.

Batch features: `input_tokens` [B,L]; `segment_ids` [B,L] token types (0 for
sentence A, 1 for sentence B; not packing ids); optional `attention_mask`
[B,L] (default `input_tokens != 0`); MLM `targets` [B,L] with `loss_weights`
[B,L] (1 at predicted positions); NSP `next_sentence_label` [B]
(0 = IsNext, 1 = NotNext, as in HF).
"""

import dataclasses
from typing import Any, Mapping, Optional, Tuple

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import layers
from t5x_lite import losses
from t5x_lite.models import common
from t5x_lite.data import feature_converters

Array = jax.Array
Batch = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT hyperparameters (defaults: BERT-base, uncased vocabulary)."""
  vocab_size: int = 30522
  emb_dim: int = 768
  num_heads: int = 12
  head_dim: int = 64
  mlp_dim: int = 3072
  num_layers: int = 12
  max_positions: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  activation: str = 'gelu_exact'  # HF 'gelu'; 'gelu' here is the tanh form
  initializer_range: float = 0.02
  dtype: Any = 'float32'  # activations / compute
  param_dtype: Any = 'float32'
  scan_layers: bool = False  # see common.run_layers
  remat_policy: str = 'none'  # see common.REMAT_POLICIES

  @property
  def hidden(self) -> int:
    return self.emb_dim


BERT_BASE = BertConfig()
BERT_LARGE = BertConfig(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=4096,
                        num_layers=24)
# A CPU-sized model; 8320 ids (a multiple of 128) cover the embedded
# vocabularies (SentencePiece 8000 + 100 sentinels, and the embedded WordPiece).
BERT_TINY = BertConfig(vocab_size=8192 + 128, emb_dim=128, num_heads=2,
                       head_dim=64, mlp_dim=512, num_layers=2,
                       max_positions=512)
SIZES = {'tiny': BERT_TINY, 'base': BERT_BASE, 'large': BERT_LARGE}


def _dense(cfg: BertConfig, features: int, axes, name: str) -> layers.Dense:
  return layers.Dense(features, kernel_axes=axes, kernel_init=common.normal_init(cfg),
                      name=name, **common.dtypes(cfg))


class Encoder(nn.Module):
  """The stack of encoder layers."""
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask, deterministic):
    return common.run_layers(common.PostNormEncoderLayer, self.config,
                             self.config.num_layers, x, mask, deterministic)


class MlmHead(nn.Module):
  """Dense + activation + LayerNorm, then tied embedding logits + bias."""
  config: BertConfig

  @nn.compact
  def __call__(self, x, token_embedder: layers.Embed) -> Array:
    cfg = self.config
    y = _dense(cfg, cfg.emb_dim, ('embed', 'mlp'), 'transform')(x)
    y = layers.activation_fn(cfg.activation)(y)
    # Named like every activation: without it XLA (jax 0.10.2, CPU) computes
    # wrong gradients on a data x fsdp x model mesh with fsdp_model_parallel.
    y = layers.constrain(common.layer_norm(cfg, 'layer_norm')(y), ('batch', 'length', 'embed'))
    bias = self.param(
        'output_bias',
        nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
        (cfg.vocab_size,), layers.canonicalize_dtype(cfg.param_dtype))
    logits = token_embedder.attend(y) + bias.astype(jnp.float32)
    return layers.constrain(logits, ('batch', 'length', 'vocab'))


class BertNetwork(nn.Module):
  """BERT with the pretraining heads; `__call__` -> (MLM [B,L,V], NSP [B,2])."""
  config: BertConfig

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(
        num_embeddings=cfg.vocab_size, features=cfg.emb_dim,
        embedding_init=common.normal_init(cfg), **common.dtypes(cfg))
    self.position_embedder = layers.PositionEmbed(
        cfg.max_positions, cfg.emb_dim, embedding_init=common.normal_init(cfg),
        **common.dtypes(cfg))
    self.segment_embedder = layers.PositionEmbed(
        cfg.type_vocab_size, cfg.emb_dim, embedding_init=common.normal_init(cfg),
        **common.dtypes(cfg))
    self.embedding_norm = common.layer_norm(cfg, 'embedding_norm')
    self.embedding_dropout = nn.Dropout(cfg.dropout_rate)
    self.encoder = Encoder(cfg)
    self.pooler = _dense(cfg, cfg.emb_dim, ('embed', 'mlp'), 'pooler')
    self.mlm_head = MlmHead(cfg)
    self.nsp_head = _dense(cfg, 2, ('embed', None), 'nsp_head')

  def encode(self, input_tokens, segment_ids=None, attention_mask=None,
             enable_dropout: bool = False) -> Tuple[Array, Array]:
    """-> (sequence output [B,L,D], pooled [CLS] output [B,D])."""
    cfg = self.config
    tokens = input_tokens.astype(jnp.int32)
    length = tokens.shape[-1]
    if length > cfg.max_positions:
      raise ValueError(f'Sequence length {length} exceeds max_positions='
                       f'{cfg.max_positions}; truncate the inputs or raise '
                       'BertConfig.max_positions.')
    if segment_ids is None:
      segment_ids = jnp.zeros_like(tokens)
    if attention_mask is None:
      attention_mask = tokens != 0
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    x = (self.token_embedder(tokens) + self.segment_embedder(segment_ids) +
         self.position_embedder(positions))
    x = self.embedding_norm(x)
    x = self.embedding_dropout(x, deterministic=not enable_dropout)
    x = layers.constrain(x, ('batch', 'length', 'embed'))
    # Keys only, as in BERT: padded queries still get (ignored) outputs.
    x = self.encoder(x, layers.make_attention_mask(None, jnp.asarray(attention_mask)),
                     not enable_dropout)
    pooled = jnp.tanh(self.pooler(x[:, 0]))
    return x, layers.constrain(pooled, ('batch', 'embed'))

  def __call__(self, input_tokens, segment_ids=None, attention_mask=None, *,
               enable_dropout: bool = False) -> Tuple[Array, Array]:
    x, pooled = self.encode(input_tokens, segment_ids, attention_mask,
                            enable_dropout)
    mlm_logits = self.mlm_head(x, self.token_embedder)
    nsp_logits = self.nsp_head(pooled).astype(jnp.float32)
    return mlm_logits, nsp_logits


class EncoderModel(common.Model):
  """Pure loss / logits / score functions over a `BertNetwork`.

  loss = weighted MLM cross-entropy / sum(loss_weights)
         + nsp_weight * mean NSP cross-entropy (when the batch has
         `next_sentence_label`).
  """
  NETWORK_CLS = BertNetwork
  NETWORK_FEATURES = ('input_tokens', 'segment_ids', 'attention_mask')
  REQUIRED_FEATURES = ('input_tokens',)
  FEATURE_CONVERTER_CLS = feature_converters.EncoderFeatureConverter

  def __init__(self, config: BertConfig, z_loss: float = 0.0,
               nsp_weight: float = 1.0):
    super().__init__(config)
    self.z_loss = z_loss
    self.nsp_weight = nsp_weight

  def dummy_batch(self, batch_size: int, length: int,
                  with_nsp: bool = True) -> dict:
    """An int32 batch with every feature the model reads (for init / shapes)."""
    ones = np.ones((batch_size, length), np.int32)
    batch = dict(input_tokens=ones, segment_ids=np.zeros_like(ones),
                 targets=ones, loss_weights=ones)
    if with_nsp:
      batch['next_sentence_label'] = np.zeros((batch_size,), np.int32)
    return batch

  def logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """MLM logits [B,L,V] float32; dropout iff `dropout_rng` and a rate > 0."""
    return self._apply(params, batch, dropout_rng)[0].astype(jnp.float32)

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None) -> Array:
    """[B,L] the most likely token at every position (int32)."""
    del rng  # deterministic
    return jnp.argmax(self.logits(params, batch), axis=-1).astype(jnp.int32)

  def nsp_logits(self, params, batch: Batch) -> Array:
    """Next-sentence logits [B,2] float32 (0 = IsNext, 1 = NotNext)."""
    return self._apply(params, batch)[1].astype(jnp.float32)

  def encode(self, params, batch: Batch) -> Tuple[Array, Array]:
    """(sequence output [B,L,D], pooled output [B,D]), dropout off."""
    return self._apply(params, batch, method=BertNetwork.encode)

  @staticmethod
  def _weights(batch: Batch) -> Array:
    weights = batch.get('loss_weights')
    if weights is None:
      raise KeyError("MLM needs 'loss_weights' (1 at predicted positions); "
                     f'batch has {sorted(batch)}.')
    return jnp.asarray(weights, jnp.float32)

  def loss_denominators(self, batch: Batch) -> dict[str, Array]:
    """What the loss and metrics of `batch` are divided by (see `loss_fn`)."""
    weight_sum = jnp.sum(self._weights(batch))
    return {'tokens': jnp.where(weight_sum > 0, weight_sum, 1.0),
            'examples': jnp.asarray(batch['input_tokens'].shape[0], jnp.float32)}

  def loss_fn(self, params, batch: Batch, dropout_rng: Optional[Array], *,
              denominators: Optional[Mapping[str, Array]] = None,
              frozen: Any = None) -> Tuple[Array, dict]:
    """(loss, metrics). Dropout iff dropout_rng and a rate > 0.

    MLM sums are divided by the predicted tokens, NSP sums by the examples,
    of `denominators` (default: `batch`'s own; a whole batch's makes the
    losses and metrics of its microbatches add up to the whole batch's).
    """
    del frozen  # nothing frozen
    d = self.loss_denominators(batch) if denominators is None else denominators
    mlm_logits, nsp_logits = self._apply(params, batch, dropout_rng)
    targets = batch['targets']
    weights = self._weights(batch)
    loss_sum, z_loss_sum, weight_sum = losses.cross_entropy_with_logits(
        mlm_logits, targets, weights, z_loss=self.z_loss)
    correct, _ = losses.weighted_accuracy(mlm_logits, targets, weights)
    mlm_loss = loss_sum / d['tokens']
    accuracy = correct / d['tokens']
    metrics = {
        'mlm_loss': mlm_loss,
        'z_loss': z_loss_sum / d['tokens'],
        'mlm_accuracy': accuracy,
        'accuracy': accuracy,
        'num_tokens': weight_sum,
        'num_examples': jnp.asarray(batch['input_tokens'].shape[0], jnp.float32),
    }
    loss = mlm_loss
    if 'next_sentence_label' in batch:
      labels = jnp.asarray(batch['next_sentence_label'], jnp.int32)
      logp = jax.nn.log_softmax(nsp_logits.astype(jnp.float32), axis=-1)
      nsp_loss = -jnp.sum(jnp.take_along_axis(logp, labels[:, None], -1)) / d['examples']
      metrics['nsp_loss'] = nsp_loss
      metrics['nsp_accuracy'] = jnp.sum(
          (jnp.argmax(nsp_logits, axis=-1) == labels).astype(jnp.float32)) / d['examples']
      loss = loss + self.nsp_weight * nsp_loss
    metrics['loss'] = loss
    return loss, metrics

  def score(self, params, batch: Batch) -> Array:
    """[B] sum over positions of loss_weight * log p(target) (MLM)."""
    token_scores = losses.log_softmax_at_targets(self.logits(params, batch),
                                                 batch['targets'])
    return jnp.sum(token_scores * self._weights(batch), axis=-1)
