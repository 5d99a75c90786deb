"""seqio Task registrations. `import t5x_lite.tasks` (in gin or Python) registers:

- `embedded_bert_pretraining`: BERT NSP pairs + 15% MLM (80/10/10) over the
  embedded corpus, with the embedded WordPiece vocabulary.
- `wikipedia_bert_pretraining`: the same over TFDS `wikipedia/20230601.en`
  (prepared in $TFDS_DATA_DIR; missing data is a `UserError` at once).
  `t5x_lite.tasks.bert.register_bert_books_wiki_mixture(paths)` adds your BooksCorpus
  files and mixes the two at BERT's 2,500 : 800 (million words).
- `embedded_lm` / `embedded_prefix_lm`: GPT causal LM (documents + EOS,
  concatenated, cut to the 'targets' length) and prefix LM (random split of
  each chunk into 'inputs' / 'targets') over the embedded corpus, with the
  embedded BPE vocabulary.
- `embedded_bart_denoising`: BART sentence permutation + text infilling over
  the embedded corpus, embedded BPE vocabulary.
- GLUE / SuperGLUE (`t5x_lite.tasks.glue`): T5's text-to-text tasks glue_*_v002 and
  super_glue_*_v102 with the mixtures glue_v002_proportional and
  super_glue_v102_proportional, read from TFDS or the original files (see
  `t5x_lite.data.glue_sources.data_settings`); classification tasks carry
  their label words as task metadata (`t5x_lite.data.registry.label_words`).
- SQuAD, CNN/DailyMail and WMT (`t5x_lite.tasks.downstream`): T5's
  squad_v010_allanswers, squad_v010_context_free, cnn_dailymail_v002 and
  wmt{14_ende,14_enfr,15_enfr,16_enro,19_ende,_t2t_ende}_v003, read from TFDS
  or the user's files (`t5x_lite.data.downstream_sources`).
- `embedded_span_corruption`: T5 span corruption over the embedded corpus
  (the stdlib documentation; always available; splits train / validation).
- `c4_v220_span_corruption`: T5 span corruption over TFDS `c4/en:3.1.0` (the
  name keeps T5's task name). Needs the data prepared in $TFDS_DATA_DIR (or
  ~/tensorflow_datasets); nothing is ever downloaded, and a missing dataset is
  a `UserError` at once.

Both use the embedded 8k vocabulary (+100 sentinels); plug in another with
`task.replace(output_features=...)` or build your own task with
`register_span_corruption_task`.

Recipe, your own corpus:

    import t5x_lite.tasks
    t5x_lite.tasks.register_span_corruption_task(
        'my_corpus_span', paths='/data/my_corpus/*.jsonl', file_format='jsonl',
        text_key='text', validation_paths='/data/my_corpus/valid.jsonl')

then train with MIXTURE_OR_TASK_NAME = 'my_corpus_span'.

Instruction tuning (`t5x_lite.tasks.instructions`): prompt / response tasks over local
instruction files (Alpaca, Dolly, chat, Super-NaturalInstructions,
Self-Instruct; `register_instruction_task`), Flan-style GLUE / SuperGLUE
instructions (glue_sst2_instruct, ...), SNI train / held-out mixtures and
`register_instruction_mixture`; names ending in '_gpt' are the GPT family's.

Preference pairs (`t5x_lite.tasks.preferences`): DPO tasks over local pair files
(`register_preference_task`; HH-RLHF, LLaMA-Factory sharegpt, plain
prompt / chosen / rejected) and the shared samples' `preference_mixture`.

RL prompts (`t5x_lite.tasks.rl`): `rl_letters`, the verifiable synthetic
task; any task with 'inputs' serves as prompts.
"""

from t5x_lite.errors import UserError

if __name__ != 't5x_lite.tasks':  # the repo's tasks/ folder imported as a top-level `tasks`
  raise UserError('the task registry is `t5x_lite.tasks`: write `import t5x_lite.tasks` '
                  f"instead of `import {__name__}`.")

# pylint: disable=g-bad-import-order,wrong-import-position
from t5x_lite.data.registry import check_data_available
from t5x_lite.tasks.span import C4_TFDS_NAME
from t5x_lite.tasks.span import register_span_corruption_task
from t5x_lite.tasks.span import span_corruption_output_features
from t5x_lite.tasks.span import span_corruption_preprocessors
from t5x_lite.tasks.bert import bert_output_features
from t5x_lite.tasks.bert import bert_preprocessors
from t5x_lite.tasks import lm
from t5x_lite.tasks import bart
from t5x_lite.tasks import bert
from t5x_lite.tasks import glue
from t5x_lite.tasks import glue_cls
from t5x_lite.tasks import downstream
from t5x_lite.tasks import instructions
from t5x_lite.tasks import preferences
from t5x_lite.tasks import rl
from t5x_lite.tasks import back_translation
