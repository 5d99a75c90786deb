"""Every gin file parses and builds its objects; user mistakes give one clear line."""

import glob
import os
import re
import subprocess
import sys
import time

import gin
import jax
import pytest

from conftest import REPO, run_env
from t5x_lite import gin_utils
from t5x_lite.errors import UserError

# Generator gins configure generation, not training: their own tests build them
# (tests/test_self_instruct.py, tests/test_back_translate.py, tests/test_evol_instruct.py,
# tests/test_orca.py).
GENERATOR_GINS = ('self_instruct', 'back_translate', 'evol_instruct', 'orca')
GIN_FILES = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, 'gin', '*.gin'))
                   if not any(name in p for name in GENERATOR_GINS))

# (vocab, emb, heads, head_dim, mlp, layers) of T5.1.1 and its parameter count
# (embedding + untied output layer + 2 x 12 layers + relative position biases).
T5_BASE_PARAMS = 247_577_856


def _macro(name):
  return gin.query_parameter(f'{name}/gin.macro.value')


def _is_eval(path):
  return path.endswith('_eval.gin')


def _build(path, *bindings):
  gin.clear_config()
  gin_utils.parse_gin([path], list(bindings))
  fn, names = 'runs.TrainConfig', ('model', 'optimizer', 'partitioner')
  if _is_eval(path):
    fn, names = 'eval_script.evaluate', ('model', 'partitioner')
  return {name: gin.query_parameter(f'{fn}.{name}').scoped_configurable_fn() for name in names}


def _num_params(model, lengths=(8, 4)):
  batch = model.dummy_batch(2, *lengths)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  import flax.linen as nn
  return sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(shapes)['params']))


def test_gin_files_exist():
  assert {'gin/t5_tiny_span.gin', 'gin/t5_small_span.gin', 'gin/t5_base_span.gin',
          'gin/bert_tiny_mlm.gin', 'gin/bert_base_mlm.gin', 'gin/gpt_tiny_lm.gin',
          'gin/gpt2_small_lm.gin', 'gin/bart_tiny_denoise.gin',
          'gin/bart_base_denoise.gin'} <= set(GIN_FILES)


@pytest.mark.parametrize('path', GIN_FILES)
def test_every_gin_file_builds(path):
  """Fine-tuning gins need a pretrained checkpoint and eval gins one to evaluate:
  any path is fine for building."""
  from t5x_lite.data import pipeline
  objs = _build(path, f"{'CHECKPOINT_PATH' if _is_eval(path) else 'INITIAL_CHECKPOINT_PATH'} = '/ckpt'")
  cfg = objs['model'].config
  task = pipeline.get_task_or_mixture(_macro('MIXTURE_OR_TASK_NAME'))
  assert cfg.vocab_size >= pipeline.output_vocab_size(task)
  assert _macro('MODEL_DIR')
  lengths = _macro('TASK_FEATURE_LENGTHS')
  if 'targets' in task.output_features:
    assert lengths and set(lengths) <= set(task.output_features)
  elif 'chosen' in task.output_features:  # preference pairs: prompt and response lengths
    assert set(lengths) == {'inputs', 'targets'}
  else:  # classification: one sequence of 'inputs' tokens built from text_a / text_b
    assert set(lengths) == {'inputs'}
  assert objs['partitioner'].mesh.size == jax.device_count()
  if not _is_eval(path):
    assert _macro('TRAIN_STEPS') > 0
    assert hasattr(objs['optimizer'], 'update')


def test_t5_base_is_t5_1_1_base():
  objs = _build('gin/t5_base_span.gin')
  cfg = objs['model'].config
  assert (cfg.vocab_size, cfg.emb_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim,
          cfg.num_encoder_layers, cfg.num_decoder_layers) == (32128, 768, 12, 64, 2048, 12, 12)
  assert (cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance) == (32, 128)
  assert not cfg.logits_via_embedding
  assert _macro('TASK_FEATURE_LENGTHS') == {'inputs': 512, 'targets': 114}
  assert _macro('BATCH_SIZE') == 128
  assert _macro('MIXTURE_OR_TASK_NAME') == 'c4_v220_span_corruption'
  assert _num_params(objs['model']) == T5_BASE_PARAMS
  schedule = gin.query_parameter('optimizers.adafactor.learning_rate').scoped_configurable_fn()
  assert float(schedule(0)) == pytest.approx(0.01)
  assert float(schedule(10_000)) == pytest.approx(0.01)
  assert float(schedule(40_000)) == pytest.approx(1 / 200)


def test_model_sizes():
  sizes = {}
  for name in ('tiny', 'small', 'base', 'large', 'xl'):
    gin.clear_config()
    gin_utils.parse_gin([f'configs/models/t5_1_1_{name}.gin'], [])
    sizes[name] = gin.query_parameter('encoder_decoder.T5Config.emb_dim')
  assert sizes == {'tiny': 128, 'small': 512, 'base': 768, 'large': 1024, 'xl': 2048}


def test_overrides_and_repeated_gin_files(tmp_path):
  extra = tmp_path / 'extra.gin'
  extra.write_text('BATCH_SIZE = 16\n')
  gin.clear_config()
  gin_utils.parse_gin(['gin/t5_tiny_span.gin', str(extra)], ['TRAIN_STEPS = 7'])
  assert _macro('BATCH_SIZE') == 16
  assert _macro('TRAIN_STEPS') == 7


def test_parse_flags():
  files, bindings = gin_utils.parse_flags(
      ['--gin_file=a.gin', '--gin_file', 'b.gin', "--gin.MODEL_DIR='/x'", '--gin.SEED=3'])
  assert files == ['a.gin', 'b.gin']
  assert bindings == ["MODEL_DIR = '/x'", 'SEED = 3']
  with pytest.raises(UserError, match='unknown argument'):
    gin_utils.parse_flags(['--gin_file=a.gin', '--steps=3'])


def _cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 't5x_lite.train', *args], cwd=REPO,
                        env=env or run_env(), capture_output=True, text=True, timeout=300)


def _one_error_line(proc):
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.rstrip().endswith(errors[0]), proc.stderr[-3000:]  # nothing after it
  return errors[0]


def test_misspelt_binding_is_one_line():
  line = _one_error_line(_cli('--gin_file=gin/t5_tiny_span.gin',
                              '--gin.encoder_decoder.T5Config.emb_dmi=64'))
  assert "'emb_dmi'" in line and 'T5Config' in line and 'did you mean emb_dim?' in line


def test_misspelt_binding_in_file_names_the_file(tmp_path):
  bad = tmp_path / 'bad.gin'
  bad.write_text("include 'gin/t5_tiny_span.gin'\ntrain_script.train.batch_sise = 3\n")
  line = _one_error_line(_cli(f'--gin_file={bad}'))
  assert 'batch_sise' in line and 'bad.gin' in line and 'line 2' in line


def test_unset_required_macro_is_one_line():
  line = _one_error_line(_cli('--gin_file=configs/models/t5_1_1_tiny.gin',
                              '--gin_file=configs/runs/pretrain.gin', '--gin.TRAIN_STEPS=5'))
  assert 'MODEL_DIR' in line and 'MIXTURE_OR_TASK_NAME' in line and 'TRAIN_STEPS' not in line


def _parse_error(files, bindings):
  gin.clear_config()
  with pytest.raises(UserError) as e:
    gin_utils.parse_gin(files, bindings)
  return str(e.value)


def test_misspelt_macro_on_the_command_line():
  assert _parse_error(['gin/t5_tiny_span.gin'], ['TRAIN_STEPZ = 5']) == (
      'gin: macro TRAIN_STEPZ (--gin.TRAIN_STEPZ) is used by no binding; '
      'did you mean TRAIN_STEPS?')
  assert _parse_error(['gin/t5_tiny_span.gin'], ['batch_size = 5', 'NO_SUCH_THING = 1']) == (
      'gin: macro batch_size (--gin.batch_size) is used by no binding; '
      'did you mean BATCH_SIZE? (also unused: NO_SUCH_THING)')
  assert _parse_error(['gin/t5_tiny_span.gin'], ['NO_SUCH_THING = 1']) == (
      'gin: macro NO_SUCH_THING (--gin.NO_SUCH_THING) is used by no binding; '
      'remove it, or refer to it as %NO_SUCH_THING in a binding.')


def test_misspelt_macro_in_a_gin_file(tmp_path):
  run = tmp_path / 'my_run.gin'
  run.write_text("include 'gin/t5_tiny_span.gin'\nTRAIN_STEPZ = 5\n")
  assert _parse_error([str(run)], []) == (
      f'gin: macro TRAIN_STEPZ ({run}:2) is used by no binding; did you mean TRAIN_STEPS?')
  run.write_text("include 'gin/t5_tiny_span.gin'\nruns.Data.batch_size = %BATCH_SIZ\n")
  assert _parse_error([str(run)], []) == (
      f'gin: %BATCH_SIZ ({run}:2) refers to a macro that is never set; did you mean BATCH_SIZE?')


def test_macros_used_through_other_macros_and_includes(tmp_path):
  """A macro counts as used wherever a `%NAME` refers to it: nested in lists,
  tuples or dicts, in another macro's value, in an included file."""
  base = tmp_path / 'base.gin'
  base.write_text("include 'gin/t5_tiny_span.gin'\nTASK_FEATURE_LENGTHS = %LENGTHS\n"
                  "LENGTHS = {'inputs': %IN, 'targets': [(%OUT,)]}\nSTEPS = 7\n")
  run = tmp_path / 'run.gin'
  run.write_text(f"include '{base}'\nTRAIN_STEPS = %STEPS\nIN = 64\nOUT = 16\n")
  gin.clear_config()
  gin_utils.parse_gin([str(run)], ['STEPS = 9', 'OUT = 8'])
  assert gin.query_parameter('OUT/gin.macro.value') == 8
  run.write_text(f"include '{base}'\nIN = 64\nOUT = 16\n")
  assert _parse_error([str(run)], ['STEPS = 9']) == (
      f'gin: macro STEPS (--gin.STEPS) is used by no binding; did you mean TRAIN_STEPS?')


def test_building_blocks_may_leave_their_macros_to_other_blocks():
  """configs/models/*.gin set MODEL for a run file, configs/runs/*.gin set
  DROPOUT_RATE for a model file: parsed alone, each leaves one unused."""
  gin.clear_config()
  gin_utils.parse_gin(['configs/models/t5_1_1_tiny.gin'], [])
  gin.clear_config()
  gin_utils.parse_gin(['configs/runs/finetune.gin'], [  # and MODEL comes from a model file
      "MODEL_DIR = '/run'", "MIXTURE_OR_TASK_NAME = 'glue_sst2_v002'", 'TRAIN_STEPS = 1',
      "INITIAL_CHECKPOINT_PATH = '/ckpt'"])


def test_no_shipped_macro_is_dead():
  """Every macro a shipped gin file sets is used (`%NAME`) by some shipped gin file."""
  paths = glob.glob(os.path.join(REPO, 'configs', '*', '*.gin')) + glob.glob(
      os.path.join(REPO, 'configs', '*.gin')) + glob.glob(os.path.join(REPO, 'gin', '*.gin'))
  texts = {os.path.relpath(p, REPO): open(p).read() for p in paths}
  used = {name for text in texts.values() for name in re.findall(r'%(\w+)', text)}
  dead = {(path, name) for path, text in texts.items()
          for name in re.findall(r'^(\w+)\s*=', text, flags=re.MULTILINE) if name not in used}
  assert not dead


def test_misspelt_parameter_suggests_the_closest():
  assert _parse_error(['gin/t5_tiny_span.gin'], ['train_script.train.log_everyy = 1']) == (
      "gin: Configurable 'train_script.train' doesn't have a parameter named 'log_everyy'; "
      'did you mean log_every? (In bindings string line 1; train_script.train.log_everyy = 1)')


def test_misspelt_configurable_suggests_the_closest(tmp_path):
  line = _parse_error(['gin/t5_tiny_span.gin'], ['encoder_decoder.T5Confg.emb_dim = 64'])
  assert line.startswith("gin: No configurable matching 'encoder_decoder.T5Confg'; "
                         'did you mean encoder_decoder.T5Config? (')
  line = _parse_error(['gin/t5_tiny_span.gin'], ["ops.kernel.name = 'plain'"])
  assert line.startswith("gin: No configurable matching 'ops.kernel'; did you mean ops.kernels?")
  run = tmp_path / 'my_run.gin'
  run.write_text("include 'gin/t5_tiny_span.gin'\n"
                 'optimizers.adafactor.learning_rate = @optimizers.rsqrt_schedul()\n')
  line = _parse_error([str(run)], [])
  assert line.startswith("gin: No configurable matching reference '@optimizers.rsqrt_schedul()'; "
                         'did you mean optimizers.rsqrt_schedule? (')
  assert f'{run}' in line and 'line 2' in line


def test_misspelt_macro_stops_train_at_once(tmp_path):
  model_dir = tmp_path / 'run'
  start = time.time()
  line = _one_error_line(_cli('--gin_file=gin/t5_tiny_span.gin', '--gin.TRAIN_STEPZ=5',
                              f"--gin.MODEL_DIR='{model_dir}'"))
  assert line == ('error: gin: macro TRAIN_STEPZ (--gin.TRAIN_STEPZ) is used by no binding; '
                  'did you mean TRAIN_STEPS?')
  assert time.time() - start < 60
  assert not model_dir.exists()


def test_missing_include_names_the_file_and_line(tmp_path):
  config = tmp_path / 'broken.gin'
  config.write_text("# a comment\ninclude 'configs/models/no_such_model.gin'\n")
  gin.clear_config()
  with pytest.raises(UserError) as e:
    gin_utils.parse_gin([str(config)], [])
  assert str(e.value) == (
      f"gin: {config}:2 includes 'configs/models/no_such_model.gin', which is not found "
      f'(looked in {os.getcwd()} and {REPO}); fix the include path.')


def test_missing_gin_file_is_one_line():
  line = _one_error_line(_cli('--gin_file=gin/no_such_file.gin'))
  assert 'no_such_file.gin' in line


def test_missing_c4_stops_at_once(tmp_path):
  env = run_env()
  env['TFDS_DATA_DIR'] = str(tmp_path)
  line = _one_error_line(_cli('--gin_file=gin/t5_base_span.gin',
                              f"--gin.MODEL_DIR='{tmp_path / 'run'}'", env=env))
  assert str(tmp_path) in line and 'c4' in line.lower() and 't5_tiny_span.gin' in line


def test_own_sentencepiece_vocabulary_by_gin(tmp_path):
  """The README's VOCABULARY snippet: another SentencePiece model replaces the task's."""
  from t5x_lite.data import pipeline, vocab
  text = open(os.path.join(REPO, 'README.md')).read()
  snippet = text.split('plugs in by gin:', 1)[1].split('```', 2)[1]
  snippet = snippet.replace('/path/to/sentencepiece.model', vocab.EMBEDDED_VOCAB_PATH)
  snippet = snippet.replace('extra_ids = 100', 'extra_ids = 50')
  (tmp_path / 'vocab.gin').write_text(snippet)
  gin.clear_config()
  gin_utils.parse_gin(['gin/t5_tiny_span.gin', str(tmp_path / 'vocab.gin')], [])
  own = _macro('VOCABULARY').scoped_configurable_fn()
  assert own.vocab_size == 8050
  ds = pipeline.get_dataset('embedded_span_corruption', {'inputs': 64, 'targets': 16}, 4,
                            vocabulary=own)
  batch = next(iter(ds))
  tokens = batch['encoder_input_tokens'].numpy()
  assert tokens.max() == 8049  # <extra_id_0> of the 50-sentinel vocabulary
  assert batch['decoder_target_tokens'].numpy().max() <= 8049


def test_own_wordpiece_vocabulary_by_gin(tmp_path):
  """The README's BERT vocab.txt snippet, with a vocab.txt in BERT's own layout."""
  from t5x_lite.data import pipeline, wordpiece
  text = open(os.path.join(REPO, 'README.md')).read()
  snippet = text.split('plugs in\nby gin:', 1)[1].split('```', 2)[1]
  pieces = [l.strip() for l in open(wordpiece.EMBEDDED_WORDPIECE_PATH) if l.strip()]
  unused = [f'[unused{i}]' for i in range(99)]  # BERT: [PAD], [unused0..98], [UNK], [CLS], ...
  bert_layout = ['[PAD]'] + unused + ['[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [
      p for p in pieces if p not in ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')]
  (tmp_path / 'vocab.txt').write_text('\n'.join(bert_layout) + '\n')
  (tmp_path / 'vocab.gin').write_text(snippet.replace('/path/to/vocab.txt', str(tmp_path / 'vocab.txt')))
  gin.clear_config()
  gin_utils.parse_gin(['gin/bert_base_mlm.gin', str(tmp_path / 'vocab.gin')], [])
  own = _macro('VOCABULARY').scoped_configurable_fn()
  assert (own.pad_id, own.unk_id, own.cls_id, own.sep_id, own.mask_id) == (0, 100, 101, 102, 103)
  ds = pipeline.get_dataset('embedded_bert_pretraining', {'inputs': 64}, 4, vocabulary=own,
                            pack=False, feature_converter_cls=_build_model_converter())
  batch = next(iter(ds))
  tokens = batch['input_tokens'].numpy()
  assert (tokens[:, 0] == 101).all()  # every pair starts with BERT's [CLS]
  assert 103 in tokens and tokens.max() < own.vocab_size


def _build_model_converter():
  return _macro('MODEL').scoped_configurable_fn().FEATURE_CONVERTER_CLS
