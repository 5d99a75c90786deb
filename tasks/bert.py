"""BERT pretraining tasks: next-sentence pairs, then masked-LM corruption."""

import seqio

from t5x_lite.data import bert_objectives
from t5x_lite.data import sources
from t5x_lite.data import wordpiece


def bert_output_features(vocabulary=None):
  """inputs / targets over one WordPiece vocabulary; [CLS]/[SEP] come from NSP."""
  vocabulary = vocabulary or wordpiece.embedded_wordpiece_vocabulary()
  return {k: seqio.Feature(vocabulary=vocabulary, add_eos=False) for k in ('inputs', 'targets')}


def bert_preprocessors():
  """documents -> [CLS] A [SEP] B [SEP] pairs -> 15% MLM (80/10/10)."""
  return [bert_objectives.nsp, bert_objectives.mlm]


seqio.TaskRegistry.add(
    'embedded_bert_pretraining',
    source=sources.embedded_source(),
    preprocessors=bert_preprocessors(),
    output_features=bert_output_features(),
    metric_fns=[])
