"""Decoder-only (GPT) tasks over the embedded corpus, with the embedded BPE vocabulary."""

import functools

import seqio

from t5x_lite.data import lm
from t5x_lite.data import sources
from t5x_lite.data import vocab as vocab_lib


def _tokenize():
  return [functools.partial(seqio.preprocessors.rekey,
                            key_map={'inputs': None, 'targets': 'text'}),
          seqio.preprocessors.tokenize]


def causal_lm_output_features(vocabulary=None):
  """'targets' only; EOS is put between documents by `lm.causal_lm`."""
  vocabulary = vocabulary or vocab_lib.embedded_bpe_vocabulary()
  return {'targets': seqio.Feature(vocabulary=vocabulary, add_eos=False)}


def prefix_lm_output_features(vocabulary=None):
  vocabulary = vocabulary or vocab_lib.embedded_bpe_vocabulary()
  return {k: seqio.Feature(vocabulary=vocabulary, add_eos=True)
          for k in ('inputs', 'targets')}


seqio.TaskRegistry.add(
    'embedded_lm',
    source=sources.embedded_source(),
    preprocessors=_tokenize() + [lm.causal_lm],
    output_features=causal_lm_output_features(),
    metric_fns=[])

seqio.TaskRegistry.add(
    'embedded_prefix_lm',
    source=sources.embedded_source(),
    preprocessors=_tokenize() + [lm.prefix_lm,
                                 seqio.preprocessors.append_eos_after_trim],
    output_features=prefix_lm_output_features(),
    metric_fns=[])
