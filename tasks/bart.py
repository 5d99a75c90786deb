"""BART denoising over the embedded corpus, with the embedded BPE vocabulary.

Each document (cut into pieces of at most targets - 1 tokens) is noised with
the paper's best combination, sentence permutation + text infilling (30% of
tokens in Poisson(3) spans, each replaced by one [MASK] = `<extra_id_0>`), and
the decoder reconstructs the original piece. Other schemes plug in by gin,
`bart_noise.bart_denoise.schemes = [...]` (see `t5x_lite.data.bart_noise`):
the entry point passes the bound arguments in as the run's
`settings.bart_denoise()` (see `t5x_lite.data.settings`).
"""

import functools

import seqio

from t5x_lite.data import bart_noise
from t5x_lite.data import lm
from t5x_lite.data import settings
from t5x_lite.data import sources
from t5x_lite.data import vocab as vocab_lib


def bart_output_features(vocabulary=None):
  vocabulary = vocabulary or vocab_lib.embedded_bpe_vocabulary()
  return {k: seqio.Feature(vocabulary=vocabulary, add_eos=True)
          for k in ('inputs', 'targets')}


def _denoise(dataset, sequence_length, output_features):
  """`bart_noise.bart_denoise` with the run's arguments for it, if any."""
  return bart_noise.bart_denoise(dataset, sequence_length, output_features,
                                 **settings.bart_denoise())


seqio.TaskRegistry.add(
    'embedded_bart_denoising',
    source=sources.embedded_source(),
    preprocessors=[
        functools.partial(seqio.preprocessors.rekey,
                          key_map={'inputs': None, 'targets': 'text'}),
        seqio.preprocessors.tokenize,
        lm.split_documents,
        _denoise,
        seqio.preprocessors.append_eos_after_trim,
    ],
    output_features=bart_output_features(),
    metric_fns=[])
