"""BERT pretraining tasks: next-sentence pairs, then masked-LM corruption."""

import seqio

from t5x_lite.data import bert_objectives
from t5x_lite.data import sources
from t5x_lite.data import wordpiece
from t5x_lite.errors import UserError


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


# BERT's own corpora (Devlin et al., 2019, section 3.1): English Wikipedia
# (2,500M words, text passages only) and BooksCorpus (800M words), mixed in
# proportion to their size.
WIKIPEDIA_TFDS_NAME = 'wikipedia/20230601.en:1.0.0'
WIKIPEDIA_WORDS, BOOKCORPUS_WORDS = 2_500, 800  # millions
WIKIPEDIA_MISSING_HINT = (
    'prepare it with tfds into TFDS_DATA_DIR (`tfds build wikipedia/20230601.en '
    '--data_dir=$TFDS_DATA_DIR`, a large download), or use gin/bert_tiny_mlm.gin '
    'to pretrain on the embedded corpus.')

seqio.TaskRegistry.add(
    'wikipedia_bert_pretraining',
    source=sources.PreparedTfdsDataSource(
        WIKIPEDIA_TFDS_NAME, splits=('train',), missing_hint=WIKIPEDIA_MISSING_HINT),
    preprocessors=bert_preprocessors(),
    output_features=bert_output_features(),
    metric_fns=[])


def register_bert_books_wiki_mixture(bookcorpus_paths, file_format='jsonl', text_key='text',
                                     name='bert_books_wiki_pretraining', vocabulary=None):
  """Registers BooksCorpus from local files and mixes it with Wikipedia as BERT did.

  BooksCorpus is not in TFDS; bring your copy as files whose documents (one per
  line for 'text'; field `text_key` for 'jsonl') hold one sentence per line
  inside the document (JSONL: '\\n' in the text), e.g. one book or chapter per
  document. The mixture samples the two tasks at rates 2,500 : 800 (the
  corpora's word counts in millions). Returns the seqio.Mixture.
  """
  if file_format == 'jsonl':
    source = sources.jsonl_file_source({'train': bookcorpus_paths}, text_key=text_key)
  elif file_format == 'text':
    source = sources.text_file_source({'train': bookcorpus_paths})
  else:
    raise UserError(f"Unknown file_format {file_format!r} for BooksCorpus; use 'jsonl' or "
                    "'text'.")
  books = f'{name}_bookcorpus'
  seqio.TaskRegistry.remove(books)
  seqio.TaskRegistry.add(books, source=source, preprocessors=bert_preprocessors(),
                         output_features=bert_output_features(vocabulary), metric_fns=[])
  seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(
      name, [('wikipedia_bert_pretraining', WIKIPEDIA_WORDS), (books, BOOKCORPUS_WORDS)])
