"""Exports a t5x_lite checkpoint as a Hugging Face model directory.

    python -m t5x_lite.export_hf --checkpoint_dir=MODEL_DIR[/checkpoints/STEP] \\
        --output_dir=OUT [--gin_file=GIN ...] [--gin.NAME=VALUE ...] \\
        [--dtype=bfloat16] [--max_shard_size=5GB] \\
        [--merge_lora | --lora_only [--base_output_dir=BASE_OUT]]

The model, its vocabulary and its task come from the run's gin (default
MODEL_DIR/config.gin, the configuration `train` wrote), the params from the
checkpoint (the newest step of MODEL_DIR, or the step directory given). OUT
then holds what `save_pretrained` writes, so that transformers loads it with
no other file:

  config.json             the architecture and sizes, special token ids
  model.safetensors       the weights (above --max_shard_size: shards and
                          model.safetensors.index.json)
  generation_config.json  the token ids generation starts, stops and pads with
  tokenizer files         written by `t5x_lite.hf.tokenizer_files` from the
                          vocabulary the model was trained with

| ours                                   | Hugging Face                       |
|----------------------------------------|------------------------------------|
| encoder_decoder.EncoderDecoderModel    | T5ForConditionalGeneration         |
| encoder.EncoderModel                   | BertForPreTraining (BertModel      |
|                                        | without pretraining heads)         |
| classification.BertClassificationModel | BertForSequenceClassification      |
| decoder.DecoderModel                   | GPT2LMHeadModel                    |
| bart.BartModel                         | BartForConditionalGeneration       |
| llama.LlamaModel                       | LlamaForCausalLM, Qwen2ForCausalLM |
|                                        | (q/k/v biases), MistralForCausalLM |
|                                        | (sliding window)                   |
| preference.DPOModel                    | its policy's                       |

A model with no exact Hugging Face counterpart (the GPT-1 style classifier,
whose head reads the EXTRACT token) is refused with one line naming it;
nothing is written. Layer-scanned checkpoints (`scan_layers`) are unstacked.

A LoRA run's checkpoint (configs/lora.gin: the adapters only, over the base
its meta names) exports in one of two ways, chosen by flag: `--merge_lora`,
the family's model with the merged kernels W + (alpha / r) A B
(`lora.merge`), as above; or `--lora_only`, a PEFT adapter directory
(`t5x_lite.hf.peft_adapter`: adapter_config.json and
adapter_model.safetensors) for `peft.PeftModel.from_pretrained`, with
`--base_output_dir` also exporting the base there (and naming it as the
adapters' base_model_name_or_path).
"""

if __name__ == '__main__':  # a run starts here: tune the host before jax and TensorFlow load
  from t5x_lite import host  # pylint: disable=g-import-not-at-top
  host.prepare()

import argparse
import json
import os
import re
import shutil
import time
from typing import Any, Optional, Sequence

import functools
import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio

from t5x_lite import checkpoints
from t5x_lite import gin_utils
from t5x_lite import lora
from t5x_lite import runs
from t5x_lite import trainer
from t5x_lite.data import glue_sources
from t5x_lite.data import registry
from t5x_lite.errors import UserError
from t5x_lite.hf import bart as hf_bart
from t5x_lite.hf import bert as hf_bert
from t5x_lite.hf import gpt2 as hf_gpt2
from t5x_lite.hf import io as hf_io
from t5x_lite.hf import llama as hf_llama
from t5x_lite.hf import peft_adapter
from t5x_lite.hf import t5 as hf_t5
from t5x_lite.hf import tokenizer_files
from t5x_lite.models import bart
from t5x_lite.models import classification
from t5x_lite.models import decoder
from t5x_lite.models import encoder
from t5x_lite.models import encoder_decoder
from t5x_lite.models import llama
from t5x_lite.models import preference
from t5x_lite.partitioning import Partitioner

# Generation settings copied from config.json into generation_config.json.
_GENERATION_IDS = ('bos_token_id', 'eos_token_id', 'pad_token_id', 'decoder_start_token_id')


def _unique_tensors(state_dict: dict) -> dict:
  """The state dict without the names that alias an earlier one (a tied head,
  BART's per-stack embeddings): transformers ties those itself on load, as
  `save_pretrained` leaves them out."""
  seen, out = set(), {}
  for name, x in state_dict.items():
    if id(x) not in seen:
      seen.add(id(x))
      out[name] = x
  return out


def hf_model(model: Any, params: Any, label_names: Optional[Sequence[str]] = None
             ) -> tuple[dict, dict]:
  """(config.json fields, {HF tensor name: numpy array}) of our model.

  Raises UserError for a model without a Hugging Face counterpart.
  """
  params = jax.tree_util.tree_map(np.asarray, params)
  config = model.config
  try:
    if isinstance(model, classification.BertClassificationModel):
      hf_config = dict(hf_bert.config_to_hf(config),
                       architectures=['BertForSequenceClassification'])
      n = model.num_classes
      names = list(label_names) if label_names and len(label_names) == n else [
          f'LABEL_{i}' for i in range(n)]
      hf_config.update(num_labels=n, id2label={str(i): v for i, v in enumerate(names)},
                       label2id={v: i for i, v in enumerate(names)},
                       classifier_dropout=model.classifier_dropout_rate,
                       problem_type='regression' if n == 1 else 'single_label_classification')
      return hf_config, hf_bert.classifier_to_hf_state_dict(params, config)
    if isinstance(model, classification.GptClassificationModel):
      raise UserError('the GPT-1 style classifier (GptClassificationModel, a head on the '
                      'EXTRACT token) has no Hugging Face counterpart and cannot be exported; '
                      "GPT2ForSequenceClassification reads the last real token with an unbiased "
                      'head instead.')
    if isinstance(model, encoder.EncoderModel):
      state_dict = hf_bert.to_hf_state_dict(params, config)
      architecture = 'BertForPreTraining' if 'cls.predictions.bias' in state_dict else 'BertModel'
      if architecture == 'BertModel':
        state_dict = {k[len('bert.'):]: v for k, v in state_dict.items()}
      return dict(hf_bert.config_to_hf(config), architectures=[architecture]), state_dict
    families = ((encoder_decoder.EncoderDecoderModel, hf_t5), (decoder.DecoderModel, hf_gpt2),
                (bart.BartModel, hf_bart), (llama.LlamaModel, hf_llama))
    for cls, module in families:
      if type(model) is cls:  # pylint: disable=unidiomatic-typecheck  (no subclass is the same)
        return module.config_to_hf(config), module.to_hf_state_dict(params, config)
  except ValueError as e:
    raise UserError(f'{type(model).__name__} cannot be exported: {e}') from None
  raise UserError(f'{type(model).__name__} has no Hugging Face export; exportable: '
                  'EncoderDecoderModel (T5), EncoderModel and BertClassificationModel (BERT), '
                  'DecoderModel (GPT-2), BartModel, LlamaModel, and a DPOModel of one of them.')


def _shard_bytes(text: str) -> int:
  """'5GB', '500MB', '2GiB' or a byte count -> bytes (HF's units: GB = 10**9)."""
  match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*', text, flags=re.IGNORECASE)
  if not match:
    raise UserError(f"--max_shard_size={text!r} is not a size; write e.g. '5GB' or '500MB'.")
  number, unit = float(match.group(1)), (match.group(2) or 'B').upper()
  powers = {'K': 1, 'M': 2, 'G': 3, 'T': 4}
  scale = 1 if unit == 'B' else (1024 if 'I' in unit else 1000) ** powers[unit[0]]
  return int(number * scale)


def export(model: Any, params: Any, vocabulary: seqio.Vocabulary, output_dir: str, *,
           label_names: Optional[Sequence[str]] = None, dtype: Optional[str] = None,
           max_shard_bytes: int = 5 * 10**9) -> str:
  """Writes the Hugging Face directory `output_dir`; returns a summary line.

  The files go into `output_dir.partial` first, renamed into place when all
  are written, so a failed export leaves no half directory behind.
  """
  if isinstance(model, preference.DPOModel):  # a DPO checkpoint is its policy's
    model = model.model
  output_dir = os.path.abspath(output_dir)
  if os.path.exists(output_dir) and os.listdir(output_dir):
    raise UserError(f'--output_dir {output_dir} is not empty; remove it or choose another.')
  hf_config, state_dict = hf_model(model, params, label_names)
  state_dict = _unique_tensors(state_dict)
  if dtype is not None:
    target = jnp.dtype(dtype)
    state_dict = {k: v.astype(target) if np.issubdtype(v.dtype, np.floating) else v
                  for k, v in state_dict.items()}
  stored = {np.dtype(v.dtype).name for v in state_dict.values()}
  partial = output_dir + '.partial'
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    token_ids = tokenizer_files.save(vocabulary, partial, model_type=hf_config['model_type'])
    hf_config = {**{k: v for k, v in token_ids.items()
                    if k.endswith('_token_id') and v is not None}, **hf_config}
    hf_config['dtype'] = sorted(stored)[0] if len(stored) == 1 else 'float32'
    with open(os.path.join(partial, 'config.json'), 'w') as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    if hf_config['architectures'][0].endswith(('LMHeadModel', 'ConditionalGeneration')):
      generation = {k: hf_config[k] for k in _GENERATION_IDS if hf_config.get(k) is not None}
      with open(os.path.join(partial, 'generation_config.json'), 'w') as f:
        json.dump(generation, f, indent=2, sort_keys=True)
    files = hf_io.write_safetensors(state_dict, partial, max_shard_bytes)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  if os.path.exists(output_dir):
    os.rmdir(output_dir)  # empty, checked above
  os.rename(partial, output_dir)
  count = sum(int(np.prod(v.shape)) for v in state_dict.values())
  size = sum(v.nbytes for v in state_dict.values())
  return (f"exported {type(model).__name__} as {hf_config['architectures'][0]} "
          f"({count:,} params, {'/'.join(sorted(stored))}, {size / 2**20:.1f} MiB in "
          f'{len(files)} weight file(s)) to {output_dir}')


def _vocabulary_and_labels(task_name: Optional[str]) -> tuple[seqio.Vocabulary, Optional[list]]:
  """The vocabulary the model was trained with (VOCABULARY, else the task's
  output features') and a classification task's label names."""
  vocabulary, labels, task = gin_utils.macro('VOCABULARY'), None, None
  if task_name:
    task = registry.get_task_or_mixture(task_name)
  if vocabulary is None:
    if task is None:
      raise UserError('the gin sets neither VOCABULARY nor MIXTURE_OR_TASK_NAME, so the '
                      "model's vocabulary is unknown; pass --gin_file=MODEL_DIR/config.gin "
                      '(or --gin.VOCABULARY=...).')
    features = task.output_features
    vocabulary = features['targets' if 'targets' in features else sorted(features)[0]].vocabulary
  source = getattr(task, 'source', None)
  if isinstance(source, glue_sources.GlueSource):
    labels = list(glue_sources.label_classes(source.benchmark, source.config) or ()) or None
  return vocabulary, labels


def _gin_model() -> Any:
  """MODEL (the run's family model), the gin already parsed."""
  model = gin_utils.macro('MODEL')
  if model is None:
    raise UserError('the gin binds no MODEL; pass the run\'s config.gin with --gin_file.')
  return model


def _shapes_and_data(model: Any) -> tuple[dict, seqio.Vocabulary, Optional[list]]:
  """(batch shapes of one row, vocabulary, label names) from the parsed gin."""
  lengths = gin_utils.macro('TASK_FEATURE_LENGTHS')
  if not lengths:
    raise UserError('the gin binds no TASK_FEATURE_LENGTHS; pass the run\'s config.gin.')
  vocabulary, labels = _vocabulary_and_labels(gin_utils.macro('MIXTURE_OR_TASK_NAME'))
  return runs.converter_batch_shapes(model, lengths, 1, pack=False), vocabulary, labels


def load(checkpoint_dir: str) -> tuple[Any, Any, seqio.Vocabulary, Optional[list], str]:
  """(model, params, vocabulary, label names, step dir) of a checkpoint, with
  the gin already parsed (MODEL, TASK_FEATURE_LENGTHS and the task or
  VOCABULARY bound)."""
  model = _gin_model()
  if isinstance(model, preference.DPOModel):
    model = model.model
  step_dir = checkpoints.resolve_step_dir(checkpoint_dir)
  shapes, vocabulary, labels = _shapes_and_data(model)
  from t5x_lite import evaluation  # pylint: disable=g-import-not-at-top
  params = evaluation.load_params(model, Partitioner(), step_dir, shapes)
  return model, jax.device_get(params), vocabulary, labels, step_dir


def _lora_model(model: Any, record: dict) -> Optional[lora.LoraModel]:
  """The LoraModel a LoRA run trained: MODEL itself, else MODEL with the
  LoraConfig the checkpoint's meta `record` holds, else the run's
  `runs.TrainConfig.model` (configs/lora.gin binds that, MODEL staying the
  family's); None if there is none of these."""
  if isinstance(model, lora.LoraModel):
    return model
  if record.get('config') is not None:
    return lora.LoraModel(model, lora.LoraConfig(**record['config']))
  try:
    value = gin.query_parameter('runs.TrainConfig.model')
  except ValueError:
    return None
  if isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
    value = value.scoped_configurable_fn()
  return value if isinstance(value, lora.LoraModel) else None


def load_lora(checkpoint_dir: str) -> tuple[lora.LoraModel, Any, Any, seqio.Vocabulary,
                                            Optional[list], str]:
  """(LoRA model, base params, adapters, vocabulary, label names, step dir) of
  a LoRA run's checkpoint (the gin parsed as for `load`): the adapters from
  the checkpoint, the base from what its meta names (the base checkpoint, or
  the random init of the run's seed)."""
  step_dir = checkpoints.resolve_step_dir(checkpoint_dir)
  record = checkpoints.read_meta(step_dir).get(lora.CHECKPOINT_META)
  if record is None:
    raise UserError(f'{step_dir} holds no LoRA adapters (its meta names no base); export it '
                    'without --merge_lora / --lora_only.')
  model = _lora_model(_gin_model(), record)
  if model is None:
    raise UserError(f'{step_dir} holds LoRA adapters but the gin trains no lora.LoraModel; '
                    "pass the LoRA run's config.gin with --gin_file.")
  shapes, vocabulary, labels = _shapes_and_data(model)
  partitioner = Partitioner()
  abstract, shardings = trainer.abstract_params(model, partitioner, shapes)
  abstract = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  adapters = checkpoints.restore_params(step_dir, abstract)
  base = trainer.base_params(model.base_model, partitioner, shapes, record['seed'],
                             record['checkpoint'])
  return (model, jax.device_get(base), jax.device_get(adapters), vocabulary, labels,
          step_dir)


def export_lora(model: lora.LoraModel, base: Any, adapters: Any, vocabulary: seqio.Vocabulary,
                output_dir: str, *, merge: bool, base_output_dir: Optional[str] = None,
                label_names: Optional[Sequence[str]] = None, dtype: Optional[str] = None,
                max_shard_bytes: int = 5 * 10**9) -> str:
  """Exports LoRA `adapters` over `base`: with `merge`, the family's model
  with the merged kernels (as `export`); else a PEFT adapter directory (and,
  with `base_output_dir`, the base exported there). Returns a summary line;
  a refusal writes nothing."""
  family = model.base_model
  if isinstance(family, preference.DPOModel):  # its policy's
    family = family.model
  if merge:
    merged = jax.device_get(lora.merge(base, adapters, model.lora_config))
    return 'merged LoRA adapters: ' + export(
        family, merged, vocabulary, output_dir, label_names=label_names, dtype=dtype,
        max_shard_bytes=max_shard_bytes)
  for path in filter(None, (output_dir, base_output_dir)):
    if os.path.exists(path) and os.listdir(path):
      raise UserError(f'{os.path.abspath(path)} is not empty; remove it or choose another.')
  base_name = None if base_output_dir is None else os.path.abspath(base_output_dir)
  fields, tensors = peft_adapter.adapter_files(
      functools.partial(hf_model, family, label_names=label_names), base, adapters,
      model.lora_config, base_name=base_name, dtype=None if dtype is None else jnp.dtype(dtype))
  summary = ''
  if base_output_dir is not None:
    summary = export(family, base, vocabulary, base_output_dir, label_names=label_names,
                     dtype=dtype, max_shard_bytes=max_shard_bytes) + '; '
  return summary + peft_adapter.write(output_dir, fields, tensors)


def _model_dir(checkpoint_dir: str) -> str:
  """MODEL_DIR of MODEL_DIR, MODEL_DIR/checkpoints or MODEL_DIR/checkpoints/STEP."""
  path = os.path.abspath(checkpoint_dir)
  if os.path.isdir(os.path.join(path, 'state')):
    path = os.path.dirname(path)
  return os.path.dirname(path) if os.path.basename(path) == 'checkpoints' else path


def main(argv: Sequence[str]) -> None:
  """Parses the flags and the gin, exports, prints the summary line."""
  import t5x_lite.tasks  # pylint: disable=g-import-not-at-top,unused-import  (the built-in tasks)
  parser = argparse.ArgumentParser(
      prog='python -m t5x_lite.export_hf',
      description='t5x_lite checkpoint -> Hugging Face model directory.')
  parser.add_argument('--checkpoint_dir', required=True,
                      help='MODEL_DIR (its newest step) or MODEL_DIR/checkpoints/STEP')
  parser.add_argument('--output_dir', required=True, help='the directory to write (new or empty)')
  parser.add_argument('--dtype', default=None, help="cast the weights, e.g. 'bfloat16'")
  parser.add_argument('--max_shard_size', default='5GB', help='shard above this size')
  how = parser.add_mutually_exclusive_group()
  how.add_argument('--merge_lora', action='store_true',
                   help='a LoRA checkpoint: export the model with the adapters merged')
  how.add_argument('--lora_only', action='store_true',
                   help='a LoRA checkpoint: write a PEFT adapter directory')
  parser.add_argument('--base_output_dir', default=None,
                      help='with --lora_only: also export the base model here')
  args, gin_args = parser.parse_known_args(list(argv))
  if not os.path.isdir(args.checkpoint_dir):
    raise UserError(f'--checkpoint_dir {args.checkpoint_dir} not found; give a MODEL_DIR or '
                    'a MODEL_DIR/checkpoints/<step> directory written by t5x_lite.')
  if args.base_output_dir is not None and not args.lora_only:
    raise UserError('--base_output_dir goes with --lora_only (the adapters\' base); drop it, '
                    'or add --lora_only.')
  files, bindings = gin_utils.parse_flags(gin_args, require_file=False)
  if not files:
    files = [os.path.join(_model_dir(args.checkpoint_dir), 'config.gin')]
    if not os.path.isfile(files[0]):
      raise UserError(f'{files[0]} not found; pass the gin the checkpoint was trained with '
                      'as --gin_file.')
  if args.dtype is not None:
    try:
      jnp.dtype(args.dtype)
    except TypeError:
      raise UserError(f"--dtype {args.dtype!r} is not a dtype; use e.g. 'bfloat16'.") from None
  max_shard_bytes = _shard_bytes(args.max_shard_size)
  gin_utils.parse_gin(files, bindings, check_required=False)
  start = time.time()
  step_dir = checkpoints.resolve_step_dir(args.checkpoint_dir)
  if args.merge_lora or args.lora_only:
    model, base, adapters, vocabulary, labels, step_dir = load_lora(step_dir)
    summary = export_lora(model, base, adapters, vocabulary, args.output_dir,
                          merge=args.merge_lora, base_output_dir=args.base_output_dir,
                          label_names=labels, dtype=args.dtype, max_shard_bytes=max_shard_bytes)
  else:
    if lora.CHECKPOINT_META in checkpoints.read_meta(step_dir):
      raise UserError(f'{step_dir} holds LoRA adapters; pass --merge_lora (the merged model) '
                      'or --lora_only (a PEFT adapter directory).')
    model, params, vocabulary, labels, step_dir = load(step_dir)
    summary = export(model, params, vocabulary, args.output_dir, label_names=labels,
                     dtype=args.dtype, max_shard_bytes=max_shard_bytes)
  print(f'{summary} from {step_dir} in {time.time() - start:.1f} s')


if __name__ == '__main__':
  import t5x_lite.export_hf as export_module  # pylint: disable=g-import-not-at-top
  gin_utils.run(export_module.main, 'export_hf')
