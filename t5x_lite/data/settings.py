"""A run's data settings, passed in where the run starts.

The data layer never reads gin. An entry point binds the settings in its gin
files and hands them to `use` (`gin_utils.parse_gin` does this after parsing);
sources and preprocessors read them here when a dataset is built:

- `glue()`: where GLUE / SuperGLUE rows come from, and those of SQuAD,
  CNN/DailyMail and WMT (`t5x_lite.data.downstream_sources`), a `DataSettings`
  (in gin, `glue_sources.data_settings.source = 'files'` and the other
  arguments of `data_settings`);
- `bart_denoise()`: the keyword arguments of `bart_noise.bart_denoise` in the
  BART denoising task (in gin, `bart_noise.bart_denoise.schemes = [...]`).

A program that builds datasets without gin calls `use` itself, e.g.
`settings.use(glue=glue_sources.data_settings(source='files', glue_dir=...))`.
"""

import dataclasses
import os
from typing import Any, Mapping, Optional, Union

# split -> file (SQuAD JSON, CNN/DailyMail JSONL), or for translation also
# split -> {language: plain-text file}.
SplitFiles = Mapping[str, Union[str, Mapping[str, str]]]

from t5x_lite.errors import UserError


@dataclasses.dataclass(frozen=True)
class DataSettings:
  source: str = 'tfds'
  glue_dir: Optional[str] = None
  super_glue_dir: Optional[str] = None
  tfds_data_dir: Optional[str] = None
  on_bad_row: str = 'raise'
  squad_files: Optional[SplitFiles] = None
  cnn_dailymail_files: Optional[SplitFiles] = None
  translation_files: Optional[Mapping[str, SplitFiles]] = None


def data_settings(source='tfds', glue_dir=None, super_glue_dir=None,
                  tfds_data_dir=None, on_bad_row='raise', squad_files=None,
                  cnn_dailymail_files=None, translation_files=None):
  """Where GLUE / SuperGLUE rows come from; bind its arguments in gin.

  Args:
    source: 'tfds' (prepared TFDS datasets, never downloaded) or 'files'
      (the original TSV / JSONL distributions).
    glue_dir: with 'files', the directory holding CoLA/, SST-2/, ... .
    super_glue_dir: with 'files', the directory holding BoolQ/, CB/, ... .
    tfds_data_dir: with 'tfds', the data dir (default $TFDS_DATA_DIR, else
      ~/tensorflow_datasets).
    on_bad_row: 'raise' (UserError naming file and line) or 'skip' (drop the
      row; one warning counts the dropped rows).
    squad_files: with 'files', {split: SQuAD JSON file (v1.1 or v2.0)} for
      the squad_v010_* tasks, e.g. {'validation': '/data/dev-v1.1.json'}.
    cnn_dailymail_files: with 'files', {split: JSONL file of {"article",
      "highlights"} rows} for cnn_dailymail_v002.
    translation_files: with 'files', {task name: {split: JSONL file of
      {"translation": {"en": ..., "de": ...}} rows, or {language: plain-text
      file} of line-aligned files}} for the wmt*_v003 tasks.

  Returns:
    A DataSettings.
  """
  if source not in ('tfds', 'files'):
    raise UserError(f"glue_sources.data_settings.source={source!r} is unknown; "
                    "use 'tfds' or 'files'.")
  if on_bad_row not in ('raise', 'skip'):
    raise UserError(f'glue_sources.data_settings.on_bad_row={on_bad_row!r} is '
                    "unknown; use 'raise' or 'skip'.")
  for name, files in (('squad_files', squad_files),
                      ('cnn_dailymail_files', cnn_dailymail_files),
                      ('translation_files', translation_files)):
    if files is not None and not isinstance(files, Mapping):
      raise UserError(f'glue_sources.data_settings.{name} must be a dict '
                      f'(split -> file), not {type(files).__name__}.')
  return DataSettings(source, glue_dir and os.fspath(glue_dir),
                      super_glue_dir and os.fspath(super_glue_dir),
                      tfds_data_dir and os.fspath(tfds_data_dir), on_bad_row,
                      squad_files, cnn_dailymail_files, translation_files)


@dataclasses.dataclass(frozen=True)
class SystemMessageSettings:
  message: Optional[str] = None
  sample_from: Optional[str] = None
  seed: int = 0
  by_task_type: bool = True


def system_message_settings(message=None, sample_from=None, seed=0, by_task_type=True):
  """The system message of instruction prompts; bind its arguments in gin.

  Args:
    message: one system message for every prompt (infer / eval's
      SYSTEM_MESSAGE); wins over `sample_from`.
    sample_from: else the name of a set to sample one per example from
      ('orca': Orca's 16; instruction tuning's SYSTEM_MESSAGES).
    seed: the sampling seed.
    by_task_type: draw from the messages of each example's task type (else
      from all the set's messages).

  Returns:
    A SystemMessageSettings.
  """
  for name, value in (('message', message), ('sample_from', sample_from)):
    if value is not None and not isinstance(value, str):
      raise UserError(f'system_messages.data_settings.{name} must be a string or None, not '
                      f'{type(value).__name__}.')
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise UserError(f'system_messages.data_settings.seed must be an integer, not {seed!r}.')
  return SystemMessageSettings(message, sample_from or None, seed, bool(by_task_type))


_GLUE = DataSettings()
_BART_DENOISE: Mapping[str, Any] = {}
_SYSTEM_MESSAGES = SystemMessageSettings()


def use(glue: Optional[DataSettings] = None,
        bart_denoise: Optional[Mapping[str, Any]] = None,
        system_messages: Optional[SystemMessageSettings] = None) -> None:
  """Sets the run's data settings; an argument left out (None) is the default."""
  global _GLUE, _BART_DENOISE, _SYSTEM_MESSAGES
  if glue is not None and not isinstance(glue, DataSettings):
    raise UserError(f'glue settings must be a DataSettings (from glue_sources.data_settings), '
                    f'not {type(glue).__name__}.')
  if system_messages is not None and not isinstance(system_messages, SystemMessageSettings):
    raise UserError('system message settings must be a SystemMessageSettings (from '
                    f'system_messages.data_settings), not {type(system_messages).__name__}.')
  _GLUE = glue or DataSettings()
  _BART_DENOISE = dict(bart_denoise or {})
  _SYSTEM_MESSAGES = system_messages or SystemMessageSettings()


def glue() -> DataSettings:
  """Where GLUE / SuperGLUE rows come from in this run."""
  return _GLUE


def bart_denoise() -> dict[str, Any]:
  """The keyword arguments of `bart_noise.bart_denoise` in this run."""
  return dict(_BART_DENOISE)


def system_messages() -> SystemMessageSettings:
  """The system message of this run's instruction prompts."""
  return _SYSTEM_MESSAGES
