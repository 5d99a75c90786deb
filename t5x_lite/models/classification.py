"""Sequence classification and regression heads for BERT and GPT (GLUE-style).

BERT (Devlin et al., 2019; Hugging Face `BertForSequenceClassification`):
the tanh-pooled [CLS] output -> dropout -> Dense(num_classes). Parameter tree:
BertNetwork's without the pretraining heads (`mlm_head`, `nsp_head`), plus

  classifier/kernel [D, C] (embed, None), classifier/bias [C]

so a pretrained BERT checkpoint (ours or imported from HF) restores all but
`classifier`, which `FRESH_PARAMS` names for `train(initial_checkpoint_path=...)`
to initialise afresh.

GPT-1 style (Radford et al., 2018) on the GPT-2 network: the input is
`[START] A [DELIM] B [EXTRACT]` (see `data.cls_features`) and a linear head
reads the final hidden state at the EXTRACT token (`extract_position`).
Parameter tree: GPTNetwork's plus `classifier/{kernel [D, C], bias [C]}`.
With `lm_weight` > 0 the loss adds that multiple of the LM loss over the
input (GPT-1 used 0.5; the default 0.0 trains the classifier only).

num_classes >= 2: softmax cross-entropy, mean over examples; metrics 'loss',
'accuracy', 'num_examples'. num_classes == 1 (regression, STS-B): mean
squared error; metrics 'loss', 'mse', 'num_examples'. Batch labels: `label`
[B] (int, or float for regression).

In gin (with a model size such as configs/models/bert_tiny.gin included):

    from t5x_lite.models import classification
    MODEL = @classification.BertClassificationModel()
    classification.BertClassificationModel:
      config = @encoder.BertConfig()
      num_classes = 3                 # tasks.glue_cls.num_classes(task name)
      classifier_dropout_rate = 0.1   # default: the config's dropout_rate
    runs.Data.pack = False
    TASK_FEATURE_LENGTHS = {'inputs': 128}

`GptClassificationModel` takes the same arguments plus `lm_weight`.
"""

import functools
from typing import Any, Mapping, Optional, Tuple

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5x_lite import layers
from t5x_lite import losses
from t5x_lite.data import cls_features
from t5x_lite.errors import UserError
from t5x_lite.models import common
from t5x_lite.models import decoder
from t5x_lite.models import encoder

Array = jax.Array
Batch = Mapping[str, Any]


def _classifier(config: Any, num_classes: int) -> layers.Dense:
  return layers.Dense(num_classes, kernel_axes=('embed', None),
                      kernel_init=common.normal_init(config), name='classifier',
                      **common.dtypes(config))


class BertClassifierNetwork(encoder.BertNetwork):
  """BERT -> pooled [CLS] -> dropout -> classifier; `__call__` -> [B,C] logits."""
  num_classes: int = 2
  classifier_dropout_rate: float = 0.1

  def setup(self):
    super().setup()
    self.classifier_dropout = nn.Dropout(self.classifier_dropout_rate)
    self.classifier = _classifier(self.config, self.num_classes)

  def __call__(self, input_tokens, segment_ids=None, attention_mask=None, *,
               enable_dropout: bool = False) -> Array:
    _, pooled = self.encode(input_tokens, segment_ids, attention_mask,
                            enable_dropout)
    pooled = self.classifier_dropout(pooled, deterministic=not enable_dropout)
    return self.classifier(pooled).astype(jnp.float32)


class GptClassifierNetwork(decoder.GPTNetwork):
  """GPT -> hidden state at `extract_position` -> dropout -> classifier.

  `__call__` -> (class logits [B,C], LM logits [B,L,V] or None unless
  `with_lm_logits`).
  """
  num_classes: int = 2
  classifier_dropout_rate: float = 0.1

  def setup(self):
    super().setup()
    self.classifier_dropout = nn.Dropout(self.classifier_dropout_rate)
    self.classifier = _classifier(self.config, self.num_classes)

  def __call__(self, decoder_input_tokens, extract_position,
               decoder_attention_mask=None, *, enable_dropout: bool = False,
               with_lm_logits: bool = False) -> Tuple[Array, Optional[Array]]:
    if decoder_attention_mask is None:
      decoder_attention_mask = jnp.ones_like(decoder_input_tokens)
    x = self.hidden_states(decoder_input_tokens,
                           decoder_attention_mask=decoder_attention_mask,
                           enable_dropout=enable_dropout)
    position = jnp.asarray(extract_position, jnp.int32)[:, None, None]
    h = jnp.take_along_axis(x, position, axis=1)[:, 0]
    h = self.classifier_dropout(h, deterministic=not enable_dropout)
    class_logits = self.classifier(h).astype(jnp.float32)
    lm_logits = self.token_embedder.attend(x) if with_lm_logits else None
    return class_logits, lm_logits


def classification_loss(logits: Array, labels: Array,
                        num_examples: Optional[Array] = None) -> Tuple[Array, dict]:
  """(loss, metrics) for [B,C] logits: CE if C >= 2, else squared error.

  Sums over the rows are divided by `num_examples` (default B; the whole
  batch's count makes a microbatch's losses add up to the batch's mean).
  """
  logits = jnp.asarray(logits, jnp.float32)
  rows = jnp.asarray(logits.shape[0], jnp.float32)
  n = rows if num_examples is None else num_examples
  if logits.shape[-1] == 1:
    mse = jnp.sum(jnp.square(logits[:, 0] - jnp.asarray(labels, jnp.float32))) / n
    return mse, {'loss': mse, 'mse': mse, 'num_examples': rows}
  labels = jnp.asarray(labels, jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss = -jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=-1)) / n
  accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)) / n
  return loss, {'loss': loss, 'accuracy': accuracy, 'num_examples': rows}


def predictions(logits: Array) -> Array:
  """[B] argmax class (int32), or the [B] float32 score when C == 1."""
  if logits.shape[-1] == 1:
    return logits[:, 0].astype(jnp.float32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


class _ClassificationModel(common.Model):
  """Shared plumbing: a head of `num_classes` with its own dropout rate.

  Args:
    config: the network's config (BertConfig / GPTConfig).
    num_classes: classes (1 = regression).
    classifier_dropout_rate: dropout before the head (default: the config's
      `dropout_rate`).
    vocabulary: the task vocabulary, when not the embedded default; the feature
      converter takes its special ids ([CLS]/[SEP], or GPT-1's reserved ids)
      from it (and fails on labels >= num_classes).
  """
  # Top-level param subtrees that a pretrained checkpoint does not have.
  FRESH_PARAMS = ('classifier',)

  def __init__(self, config: Any, num_classes: int = 2,
               classifier_dropout_rate: Optional[float] = None, vocabulary=None):
    if num_classes < 1:
      raise UserError(f'num_classes={num_classes} must be >= 1 (1 = regression).')
    super().__init__(config)
    self.num_classes = num_classes
    self.classifier_dropout_rate = (config.dropout_rate if classifier_dropout_rate is None
                                    else classifier_dropout_rate)
    self.module = self.NETWORK_CLS(config, num_classes=num_classes,
                                   classifier_dropout_rate=self.classifier_dropout_rate)
    # The converter takes its special ids from `vocabulary` and checks labels.
    self.FEATURE_CONVERTER_CLS = functools.partial(
        type(self).FEATURE_CONVERTER_CLS, vocabulary=vocabulary, num_classes=num_classes)

  def _apply(self, params, batch: Batch, dropout_rng: Optional[Array] = None, **kwargs):
    """The network's output; dropout iff `dropout_rng` and a rate (head's too) > 0."""
    rates = (self.config.dropout_rate, self.config.attention_dropout_rate,
             self.classifier_dropout_rate)
    enable_dropout = dropout_rng is not None and max(rates) > 0
    rngs = {'dropout': dropout_rng} if enable_dropout else None
    return self.module.apply({'params': params}, **self._network_inputs(batch),
                             enable_dropout=enable_dropout, rngs=rngs, **kwargs)

  def loss_denominators(self, batch: Batch) -> dict[str, Array]:
    """What the loss and metrics of `batch` are divided by (see `loss_fn`)."""
    return {'examples': jnp.asarray(batch['label'].shape[0], jnp.float32)}

  def logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """[B,C] float32 class logits (`class_logits`)."""
    return self.class_logits(params, batch, dropout_rng)

  def predict_batch(self, params, batch: Batch, rng: Optional[Array] = None) -> Array:
    """[B] predicted class (int32), or the predicted score for regression."""
    del rng  # deterministic
    return predictions(self.class_logits(params, batch))

  def score(self, params, batch: Batch) -> Array:
    """[B] log p(label), or minus the squared error for regression."""
    logits = self.class_logits(params, batch)
    if self.num_classes == 1:
      return -jnp.square(logits[:, 0] - jnp.asarray(batch['label'], jnp.float32))
    labels = jnp.asarray(batch['label'], jnp.int32)[:, None]
    return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels, axis=-1)[:, 0]


class BertClassificationModel(_ClassificationModel):
  """BERT sequence classifier / regressor (see the module docstring)."""
  NETWORK_CLS = BertClassifierNetwork
  NETWORK_FEATURES = ('input_tokens', 'segment_ids', 'attention_mask')
  REQUIRED_FEATURES = ('input_tokens',)
  FEATURE_CONVERTER_CLS = cls_features.BertClassificationFeatureConverter

  def dummy_batch(self, batch_size: int, length: int) -> dict:
    """A batch with every feature the model reads (for init / shapes)."""
    ones = np.ones((batch_size, length), np.int32)
    label_dtype = np.float32 if self.num_classes == 1 else np.int32
    return dict(input_tokens=ones, segment_ids=np.zeros_like(ones),
                attention_mask=ones, label=np.zeros((batch_size,), label_dtype))

  def class_logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """[B,C] float32 logits; dropout iff `dropout_rng` and a rate > 0."""
    return self._apply(params, batch, dropout_rng)

  @property
  def computes_vocab_logits(self) -> bool:
    return False

  def loss_fn(self, params, batch: Batch, dropout_rng: Optional[Array], *,
              denominators: Optional[Mapping[str, Array]] = None,
              frozen: Any = None) -> Tuple[Array, dict]:
    """(loss, metrics). Dropout iff dropout_rng and a rate > 0."""
    del frozen  # nothing frozen
    d = self.loss_denominators(batch) if denominators is None else denominators
    return classification_loss(self._apply(params, batch, dropout_rng), batch['label'],
                               d['examples'])


class GptClassificationModel(_ClassificationModel):
  """GPT-1 style classifier / regressor on the GPT-2 network.

  Args as `_ClassificationModel`, and
    lm_weight: weight of the auxiliary LM loss over the input tokens (GPT-1:
      0.5); its metric is 'lm_loss'.
  """
  NETWORK_CLS = GptClassifierNetwork
  NETWORK_FEATURES = ('decoder_input_tokens', 'extract_position', 'decoder_attention_mask')
  REQUIRED_FEATURES = ('decoder_input_tokens', 'extract_position')
  FEATURE_CONVERTER_CLS = cls_features.GptClassificationFeatureConverter
  DECODER_ONLY = True

  def __init__(self, config: Any, num_classes: int = 2,
               classifier_dropout_rate: Optional[float] = None, lm_weight: float = 0.0,
               vocabulary=None):
    super().__init__(config, num_classes, classifier_dropout_rate, vocabulary)
    self.lm_weight = lm_weight

  def dummy_batch(self, batch_size: int, length: int) -> dict:
    """A batch with every feature the model reads (for init / shapes)."""
    ones = np.ones((batch_size, length), np.int32)
    label_dtype = np.float32 if self.num_classes == 1 else np.int32
    return dict(decoder_input_tokens=ones, decoder_attention_mask=ones,
                extract_position=np.full((batch_size,), length - 1, np.int32),
                label=np.zeros((batch_size,), label_dtype))

  def class_logits(self, params, batch: Batch, dropout_rng: Optional[Array] = None) -> Array:
    """[B,C] float32 logits; dropout iff `dropout_rng` and a rate > 0."""
    return self._apply(params, batch, dropout_rng)[0]

  @property
  def computes_vocab_logits(self) -> bool:
    """Only for GPT-1's auxiliary LM loss."""
    return self.lm_weight > 0

  def _lm_weights(self, batch: Batch) -> Array:
    """Position t predicts token t + 1 wherever both are real."""
    tokens = batch['decoder_input_tokens']
    mask = batch.get('decoder_attention_mask', jnp.ones_like(tokens))
    return jnp.asarray(mask[:, :-1] * mask[:, 1:], jnp.float32)

  def loss_denominators(self, batch: Batch) -> dict[str, Array]:
    d = super().loss_denominators(batch)
    if self.lm_weight > 0:
      d['lm_tokens'] = jnp.maximum(jnp.sum(self._lm_weights(batch)), 1.0)
    return d

  def loss_fn(self, params, batch: Batch, dropout_rng: Optional[Array], *,
              denominators: Optional[Mapping[str, Array]] = None,
              frozen: Any = None) -> Tuple[Array, dict]:
    """(loss, metrics). Dropout iff dropout_rng and a rate > 0."""
    del frozen  # nothing frozen
    d = self.loss_denominators(batch) if denominators is None else denominators
    with_lm = self.lm_weight > 0
    logits, lm_logits = self._apply(params, batch, dropout_rng, with_lm_logits=with_lm)
    loss, metrics = classification_loss(logits, batch['label'], d['examples'])
    if with_lm:
      tokens = batch['decoder_input_tokens']
      loss_sum, _, _ = losses.cross_entropy_with_logits(
          lm_logits[:, :-1], tokens[:, 1:], self._lm_weights(batch))
      lm_loss = loss_sum / d['lm_tokens']
      loss = loss + self.lm_weight * lm_loss
      metrics = dict(metrics, loss=loss, lm_loss=lm_loss)
    return loss, metrics
