"""Imports a Hugging Face checkpoint as a t5x_lite checkpoint plus model gin.

    python -m t5x_lite.import_hf --hf_dir DIR --output_dir OUT [--dtype float32]

DIR is a `save_pretrained` directory (config.json + safetensors or
pytorch_model.bin, sharded or not) of a supported family (T5 / mT5, BERT,
GPT-2, BART). Writes

  OUT/checkpoint/  params, as `checkpoints.restore_params` reads them (orbax)
  OUT/tokenizer/   DIR's tokenizer files, when it has a tokenizer
                   (tokenizer.json, or vocab.json + merges.txt; see
                   `t5x_lite.data.hf_vocab`)
  OUT/model.gin    the model configuration, with seqio's padding and
                   decoder-start id 0 where the HF config has others
                   (BART); with a tokenizer, `VOCABULARY =
                   @vocab.hf_vocabulary()` over OUT/tokenizer, so every task
                   of a run speaks the model's own ids (and, where id 0 is a
                   token, GPT-2's '!', the feature converter for it)

To fine-tune from it, in a run gin (model.gin after the run gin, whose
`VOCABULARY = None` it overrides):

  include 'configs/runs/pretrain.gin'
  include 'OUT/model.gin'
  INITIAL_CHECKPOINT_PATH = 'OUT/checkpoint'
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import argparse
import logging
import os
import shutil
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import seqio

from t5x_lite import checkpoints
from t5x_lite import hf
from t5x_lite.data import hf_vocab
from t5x_lite.errors import UserError


def import_hf(hf_dir: str, output_dir: str, dtype: str = 'float32') -> str:
  """Writes OUT/checkpoint and OUT/model.gin; returns a one-line summary."""
  hf_dir, output_dir = os.path.abspath(hf_dir), os.path.abspath(output_dir)
  try:
    dtype = jnp.dtype(dtype).name
  except TypeError:
    raise UserError(f"--dtype {dtype!r} is not a dtype; use e.g. 'float32' or "
                    "'bfloat16'.") from None
  ckpt_dir = os.path.join(output_dir, 'checkpoint')
  gin_path = os.path.join(output_dir, 'model.gin')
  if os.path.exists(ckpt_dir):
    raise UserError(f'{ckpt_dir} already exists; remove it or choose another '
                    '--output_dir.')
  model, params = hf.load(hf_dir, dtype=dtype)
  tokenizer_files = hf_vocab.tokenizer_files(hf_dir)
  if tokenizer_files:  # read it before writing anything: a broken one stops here
    vocabulary = hf_vocab.HfTokenizerVocabulary(hf_dir)
  state = {'params': jax.tree_util.tree_map(jnp.asarray, params)}
  meta = {'step': 0, 'data_position': 0, 'source': hf_dir,
          'fingerprint': [int(v) for v in checkpoints.fingerprint(state)]}
  os.makedirs(output_dir, exist_ok=True)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
    ckptr.save(ckpt_dir, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  text = hf.gin_text(model) + seqio_ids_gin(model.config)
  tokenizer = ''
  if tokenizer_files:
    tokenizer_dir = os.path.join(output_dir, 'tokenizer')
    os.makedirs(tokenizer_dir, exist_ok=True)
    for name in tokenizer_files:
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tokenizer_dir, name))
    text += vocabulary_gin(tokenizer_dir)
    if vocabulary.zero_is_text and model.FEATURE_CONVERTER_CLS is seqio.DecoderFeatureConverter:
      text += zero_is_text_gin(model)
    tokenizer = f', tokenizer {tokenizer_dir} ({vocabulary.vocab_size:,} ids)'
  with open(gin_path, 'w') as f:
    f.write(f'# Imported from {hf_dir} by t5x_lite.import_hf.\n')
    f.write(text)
  count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
  return (f'imported {type(model).__name__} ({type(model.config).__name__}, '
          f'{count:,} params, {dtype}) from {hf_dir}: checkpoint {ckpt_dir}'
          f'{tokenizer}, gin {gin_path}')


# The ids every seqio pipeline feeds a model: padding 0 and decoder inputs
# that start with 0 (feature converters' make_autoregressive_inputs).
SEQIO_IDS = {'pad_id': 0, 'decoder_start_id': 0}


def seqio_ids_gin(config) -> str:
  """Gin lines (after a model's `gin_text`) that rebind the config's padding
  and decoder-start ids to seqio's 0 where the Hugging Face config has others
  (BART: pad 1, start 2), so that a run's masks and generation match its data;
  '' where they already agree."""
  changed = {k: v for k, v in SEQIO_IDS.items() if getattr(config, k, v) != v}
  if not changed:
    return ''
  name = f'{type(config).__module__.rsplit(".", 1)[1]}.{type(config).__name__}'
  return ('\n# seqio pipelines pad with 0 and start decoder inputs with 0 (the values '
          'above are Hugging Face\'s).\n' +
          ''.join(f'{name}.{k} = {v!r}\n' for k, v in changed.items()))


def zero_is_text_gin(model) -> str:
  """Gin lines giving a decoder-only model the feature converter for a
  tokenizer whose id 0 is a token (GPT-2's '!'; see `hf_vocab`)."""
  name = f'{type(model).__module__.rsplit(".", 1)[1]}.{type(model).__name__}'
  return ("\n# Id 0 is a token of this tokenizer (GPT-2's '!'), not padding: a converter that\n"
          '# tells the two apart (seqio\'s takes every 0 for padding).\n'
          'from t5x_lite.data import hf_vocab\n'
          f'{name}.feature_converter_cls = @hf_vocab.ZeroIsTextDecoderFeatureConverter\n')


def vocabulary_gin(tokenizer_dir: str) -> str:
  """Gin lines (after a model's `gin_text`) that make the tokenizer in
  `tokenizer_dir` the run's vocabulary."""
  return ('\n# The tokenizer imported with the model: every task of the run uses its ids.\n'
          'from t5x_lite.data import vocab\n'
          'VOCABULARY = @vocab.hf_vocabulary()\n'
          f'vocab.hf_vocabulary.directory = {tokenizer_dir!r}\n')


def main(argv: Sequence[str]) -> None:
  """Parses the flags, imports, prints the summary line."""
  parser = argparse.ArgumentParser(
      prog='python -m t5x_lite.import_hf',
      description='Hugging Face checkpoint -> t5x_lite checkpoint + model gin.')
  parser.add_argument('--hf_dir', required=True,
                      help='save_pretrained directory (config.json + weights)')
  parser.add_argument('--output_dir', required=True,
                      help='writes OUT/checkpoint and OUT/model.gin')
  parser.add_argument('--dtype', default='float32', help='param dtype')
  args = parser.parse_args(argv)
  print(import_hf(args.hf_dir, args.output_dir, args.dtype))


def run(argv: Sequence[str]) -> None:
  """`main`, with a UserError printed as one line and exit status 2."""
  logging.basicConfig(level=logging.WARNING,
                      format='%(levelname)s %(name)s: %(message)s')
  try:
    main(argv)
  except UserError as e:
    print(f'error: {str(e).strip().splitlines()[0]}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  run(sys.argv[1:])
