"""Our vocabularies as Hugging Face tokenizer files, for `export_hf`.

    ids = tokenizer_files.save(vocabulary, out_dir, model_type='t5')

writes the files `transformers.AutoTokenizer.from_pretrained(out_dir)` loads,
and returns the special-token ids the model's `config.json` and
`generation_config.json` need. Nothing here imports torch or transformers: the
files are built with the `tokenizers` library and SentencePiece's protobuf.

What is written, by vocabulary:

  seqio.SentencePieceVocabulary (unigram or BPE, ours or a user's):
      tokenizer.json   SentencePiece's pipeline in `tokenizers` terms: the
                       model's precompiled normaliser and whitespace rules
                       (extra whitespace removal, dummy prefix, `▁`), the
                       Unigram or BPE model with its byte fallback (BPE merges
                       ranked by the score of the merged piece, as SentencePiece
                       merges), and the sentinels `<extra_id_N>` as added
                       tokens with seqio's ids (8099 down to 8000 for ours);
      spiece.model     the SentencePiece model without the sentinels, as T5
                       ships it (`extra_ids` in tokenizer_config.json);
      tokenizer_config.json (`tokenizer_class` PreTrainedTokenizerFast),
      special_tokens_map.json.
  WordPieceVocabulary:
      vocab.txt, tokenizer.json (BERT's normaliser and pre-tokeniser over a
      WordPiece model), tokenizer_config.json (`BertTokenizer`,
      `do_lower_case`, [PAD] [UNK] [CLS] [SEP] [MASK]), special_tokens_map.json.

Why PreTrainedTokenizerFast for SentencePiece, not T5Tokenizer, GPT2Tokenizer
or BartTokenizer: transformers 5 rebuilds those classes from fixed recipes
(T5Tokenizer without byte fallback, so characters outside the vocabulary
become <unk> rather than our byte pieces; GPT2Tokenizer and BartTokenizer as
byte-level BPE over vocab.json + merges.txt), so none gives our ids. With
PreTrainedTokenizerFast, AutoTokenizer loads tokenizer.json as written,
whatever model_type config.json names. `T5Tokenizer.from_pretrained` still
works on the directory (sentinel ids equal; no byte fallback).

Special tokens: the tokenizer ends T5 and BART inputs with EOS
(`add_special_tokens=True`), as our pipelines do; GPT-2 inputs get none.
`split_special_tokens` is set, so `</s>` or `[CLS]` written in text is
characters, as for our vocabularies (the pipelines add special tokens as ids);
the sentinels are plain added tokens, so `<extra_id_N>` written as a word in
text is its id, as for seqio. BART's mask (<extra_id_0>) is returned as
`mask_token_id` but not declared as the tokenizer's `mask_token`, which would
make it special and split in text.

Where the Hugging Face tokenizer and ours differ by construction:
  * decoding: seqio stops at the first EOS, drops pad and writes unk as
    ` ⁇ `; Hugging Face writes `<pad>`, `</s>`, `<unk>`, or drops them with
    `skip_special_tokens=True` (then, up to EOS, the texts are equal);
  * a sentinel written in text not as a word (`a<extra_id_0>`), or with runs
    of spaces around it: SentencePiece matches `▁<extra_id_N>` only at a word
    start and keeps the other spaces, Hugging Face matches anywhere and takes
    the spaces around it;
  * a user's Unigram model without byte fallback: where a literal `<unk>`
    (`</s>`, `<pad>`) in text has a character the model lacks, the Unigram of
    `tokenizers` takes the control piece, SentencePiece unk and the rest;
  * WordPiece: ours (tensorflow_text) lower-cases with ICU's NFKC case
    folding and splits at vertical tab / form feed; BERT's normaliser
    lower-cases (`ß`, ligatures, full-width and mathematical letters differ)
    and deletes those two as control characters (cased vocabularies also
    differ at format characters such as the zero-width joiner, where
    tensorflow_text splits and BERT deletes). Its decoder also attaches `.`,
    `,`, `!`, `?` to the word before.
"""

import json
import os
import shutil
from typing import Dict, Optional

import seqio
from sentencepiece import sentencepiece_model_pb2
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from t5x_lite.data import hf_vocab
from t5x_lite.data import wordpiece
from t5x_lite.errors import UserError

MODEL_TYPES = ('t5', 'bert', 'gpt2', 'bart', 'llama', 'mistral', 'qwen2')
# Decoder-only families: no EOS appended, generation starts from id 0.
DECODER_ONLY = ('gpt2', 'llama', 'mistral', 'qwen2')
_SPIECE = sentencepiece_model_pb2.ModelProto.SentencePiece
# Pieces SentencePiece never produces from text: the model must not either.
_NOT_FROM_TEXT = (_SPIECE.CONTROL, _SPIECE.UNKNOWN, _SPIECE.BYTE, _SPIECE.UNUSED)
SENTINEL_PREFIX = '<extra_id_'
_NEVER = -1e9  # score of those pieces in a Unigram model: never on the best path


def save(vocabulary: seqio.Vocabulary, directory: str, *, model_type: str,
         model_max_length: Optional[int] = None) -> Dict[str, Optional[int]]:
  """Writes `vocabulary` as Hugging Face tokenizer files into `directory`.

  Args:
    vocabulary: a `seqio.SentencePieceVocabulary` (unigram or BPE), a
      `wordpiece.WordPieceVocabulary`, or a Hugging Face tokenizer read by
      `hf_vocab.HfTokenizerVocabulary` (an imported model's), whose files are
      copied as they are.
    directory: created if missing; config.json is the caller's.
    model_type: the Hugging Face model_type of the export ('t5', 'bert',
      'gpt2', 'bart'); it decides the special tokens added around a sequence
      and the ids returned.
    model_max_length: the longest input the model takes (learned position
      tables), written as tokenizer_config.json's `model_max_length`; None
      leaves it out (no limit, as for T5's relative positions).

  Returns:
    The special-token ids for config.json / generation_config.json:
    `pad_token_id`, `eos_token_id`, `unk_token_id`, `bos_token_id`,
    `decoder_start_token_id` (encoder-decoders), and for BERT also
    `cls_token_id`, `sep_token_id`, `mask_token_id`; None where the family has
    no such token.
  """
  if model_type not in MODEL_TYPES:
    raise UserError(f'Tokenizer export supports model_type {", ".join(MODEL_TYPES)}; '
                    f'got {model_type!r}.')
  os.makedirs(directory, exist_ok=True)
  if isinstance(vocabulary, hf_vocab.HfTokenizerVocabulary):  # imported: its own files
    for name in hf_vocab.tokenizer_files(vocabulary.directory):
      shutil.copyfile(os.path.join(vocabulary.directory, name), os.path.join(directory, name))
    ids = {'pad_token_id': vocabulary.hf_pad_id, 'eos_token_id': vocabulary.eos_id,
           'unk_token_id': vocabulary.unk_id, 'bos_token_id': vocabulary.bos_id}
    if model_type in ('t5', 'bart'):
      ids['decoder_start_token_id'] = 0  # seqio's shifted-right targets start with 0
    return ids
  if isinstance(vocabulary, wordpiece.WordPieceVocabulary):
    ids, config = _save_wordpiece(vocabulary, directory, model_type)
  elif isinstance(vocabulary, seqio.SentencePieceVocabulary):
    ids, config = _save_sentencepiece(vocabulary, directory, model_type)
  else:
    raise UserError(
        f'Cannot export a {type(vocabulary).__name__} as a Hugging Face tokenizer; only '
        'SentencePiece (seqio.SentencePieceVocabulary) and WordPiece vocabularies are supported.')
  # split_special_tokens: `</s>` or `[CLS]` in text is characters, as for our
  # vocabularies (special tokens come from the pipelines as ids).
  config.update(clean_up_tokenization_spaces=False, split_special_tokens=True)
  if model_max_length is not None:
    config['model_max_length'] = int(model_max_length)
  special = {k: v for k, v in config.items() if k.endswith('_token')}
  _write_json(os.path.join(directory, 'tokenizer_config.json'), config)
  _write_json(os.path.join(directory, 'special_tokens_map.json'), special)
  return ids


# ----------------------------------------------------------------------------
# SentencePiece.


def split_extra_ids(vocabulary: seqio.SentencePieceVocabulary):
  """(base ModelProto, [(sentinel token, id)]) of a seqio vocabulary.

  seqio appends its `extra_ids` to the model as user-defined pieces
  `▁<extra_id_N>`; the base model is the one without them (what spiece.model
  holds), the sentinels become `<extra_id_N>` tokens with the same ids.
  """
  proto = sentencepiece_model_pb2.ModelProto.FromString(vocabulary.sp_model)
  n = vocabulary.extra_ids
  base = len(proto.pieces) - n
  sentinels = []
  for i in range(base, len(proto.pieces)):
    piece = proto.pieces[i].piece
    if not piece.startswith('▁' + SENTINEL_PREFIX):
      raise ValueError(f'piece {i} of {vocabulary.sentencepiece_model_file} is {piece!r}, '
                       'not a seqio sentinel')
    sentinels.append((piece[1:], i))
  del proto.pieces[base:]
  return proto, sentinels


def _sp_normalizer(spec):
  """SentencePiece's normalisation (`NormalizerSpec`) as a `tokenizers` normaliser."""
  steps = []
  if spec.precompiled_charsmap:
    steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
  if spec.remove_extra_whitespaces:
    steps += [normalizers.Strip(left=True, right=True),
              normalizers.Replace(tokenizers.Regex(' {2,}'), ' ')]
  if spec.add_dummy_prefix:
    steps.append(normalizers.Prepend(' '))
  if spec.escape_whitespaces:
    steps.append(normalizers.Replace(' ', '▁'))
  return normalizers.Sequence(steps)


def _sp_decoder(spec, byte_fallback, sentinels):
  steps = []
  if sentinels:  # seqio's sentinel pieces are `▁<extra_id_N>`: a space before each
    steps.append(decoders.Replace(SENTINEL_PREFIX, '▁' + SENTINEL_PREFIX))
  if spec.escape_whitespaces:
    steps.append(decoders.Replace('▁', ' '))
  if byte_fallback:
    steps.append(decoders.ByteFallback())
  steps.append(decoders.Fuse())
  if spec.add_dummy_prefix:
    steps.append(decoders.Strip(' ', 1, 0))  # after Fuse: the first character only
  return decoders.Sequence(steps)


def _bpe_merges(proto):
  """BPE merges in SentencePiece's order: a pair whose joined piece scores higher first."""
  ids = {p.piece: i for i, p in enumerate(proto.pieces)
         if p.type not in _NOT_FROM_TEXT + (_SPIECE.USER_DEFINED,)}
  ranked = []
  for piece, i in ids.items():
    for k in range(1, len(piece)):
      left, right = piece[:k], piece[k:]
      if left in ids and right in ids:
        ranked.append((-proto.pieces[i].score, i, ids[left], left, right))
  ranked.sort()
  return [(left, right) for *_, left, right in ranked]


def sentencepiece_tokenizer(proto, sentinels) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` giving SentencePiece's ids for the model `proto`.

  Args:
    proto: a SentencePiece ModelProto (unigram or BPE), without sentinels.
    sentinels: [(token, id)] added as (not special) tokens after the pieces.
  """
  trainer, pieces = proto.trainer_spec, proto.pieces
  byte_fallback = trainer.byte_fallback
  unk = pieces[trainer.unk_id].piece if trainer.unk_id >= 0 else None
  if trainer.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
    vocab = [(p.piece, _NEVER if p.type in _NOT_FROM_TEXT else p.score) for p in pieces]
    model = models.Unigram(vocab, unk_id=trainer.unk_id if unk else None,
                           byte_fallback=byte_fallback)
  elif trainer.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    model = models.BPE(vocab, _bpe_merges(proto), unk_token=unk, fuse_unk=True,
                       byte_fallback=byte_fallback)
  else:
    raise UserError(
        'SentencePiece model type '
        f'{sentencepiece_model_pb2.TrainerSpec.ModelType.Name(trainer.model_type)} '
        'cannot be exported; only UNIGRAM and BPE models can.')
  tokenizer = tokenizers.Tokenizer(model)
  tokenizer.normalizer = _sp_normalizer(proto.normalizer_spec)
  tokenizer.pre_tokenizer = None
  tokenizer.decoder = _sp_decoder(proto.normalizer_spec, byte_fallback, sentinels)
  specials = [tokenizers.AddedToken(p.piece, special=True, normalized=False)
              for p in pieces if p.type in (_SPIECE.CONTROL, _SPIECE.UNKNOWN)]
  users = [tokenizers.AddedToken(p.piece, special=False, normalized=False)
           for p in pieces if p.type == _SPIECE.USER_DEFINED]
  tokenizer.add_special_tokens(specials)
  tokenizer.add_tokens(users)
  for token, i in sentinels:
    # lstrip / rstrip: the piece is `▁<extra_id_N>`, and the text after it gets
    # its own dummy prefix, so the spaces around a sentinel are the sentinel's.
    added = tokenizers.AddedToken(token, special=False, normalized=False, lstrip=True, rstrip=True)
    if tokenizer.add_tokens([added]) != 1 \
        or tokenizer.token_to_id(token) != i:
      raise ValueError(f'sentinel {token} did not get id {i}')
  return tokenizer


def _piece_or_none(proto, i):
  return proto.pieces[i].piece if 0 <= i < len(proto.pieces) else None


def _save_sentencepiece(vocabulary, directory, model_type):
  proto, sentinels = split_extra_ids(vocabulary)
  trainer = proto.trainer_spec
  pad, eos, unk = (_piece_or_none(proto, i) for i in (trainer.pad_id, trainer.eos_id, trainer.unk_id))
  bos = _piece_or_none(proto, trainer.bos_id)
  tokenizer = sentencepiece_tokenizer(proto, sentinels)
  if eos is not None and model_type in ('t5', 'bart'):  # inputs end with EOS, as ours do
    tokenizer.post_processor = processors.TemplateProcessing(
        single=['$A', eos], pair=['$A', eos, '$B', eos], special_tokens=[(eos, trainer.eos_id)])
  tokenizer.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'spiece.model'), 'wb') as f:
    f.write(proto.SerializeToString())

  sentinel_tokens = [t for t, _ in sorted(sentinels, key=lambda s: int(s[0][len(SENTINEL_PREFIX):-1]))]
  special = _drop_none({'bos_token': bos, 'eos_token': eos, 'unk_token': unk, 'pad_token': pad})
  config = dict(special, tokenizer_class='PreTrainedTokenizerFast', extra_ids=len(sentinels))

  ids = {'pad_token_id': _id(trainer.pad_id), 'eos_token_id': _id(trainer.eos_id),
         'unk_token_id': _id(trainer.unk_id), 'bos_token_id': _id(trainer.bos_id)}
  if model_type in DECODER_ONLY and ids['bos_token_id'] is None:
    # Our decoders read inputs shifted right: generation starts from id 0.
    ids['bos_token_id'] = 0
  if model_type in ('t5', 'bart'):
    # Our encoder-decoders start decoding from id 0 (shifted-right targets).
    ids['decoder_start_token_id'] = 0
  if model_type == 'bart' and sentinel_tokens:
    # BART's [MASK] is <extra_id_0> in our pipelines. It is not declared as
    # the tokenizer's mask_token: special tokens in text are split (see save).
    ids['mask_token_id'] = dict(sentinels)[sentinel_tokens[0]]
  return ids, config


def _id(i):
  return int(i) if i is not None and i >= 0 else None


def _drop_none(d):
  return {k: v for k, v in d.items() if v is not None}


def _write_json(path, obj):
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write('\n')


# ----------------------------------------------------------------------------
# WordPiece.


def wordpiece_tokenizer(vocabulary) -> tokenizers.Tokenizer:
  """BERT's tokenizer over `vocabulary`'s tokens (what BertTokenizer builds)."""
  tokens = vocabulary.tokens
  vocab = {}
  for i, token in enumerate(tokens):
    vocab.setdefault(token, i)
  tokenizer = tokenizers.Tokenizer(models.WordPiece(
      vocab, unk_token=wordpiece.UNK, max_input_chars_per_word=100))
  tokenizer.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=True, strip_accents=vocabulary.lower_case,
      lowercase=vocabulary.lower_case)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece(prefix='##')
  cls, sep = wordpiece.CLS, wordpiece.SEP
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f'{cls}:0 $A:0 {sep}:0', pair=f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1',
      special_tokens=[(cls, vocabulary.cls_id), (sep, vocabulary.sep_id)])
  tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t in wordpiece.RESERVED_TOKENS])
  return tokenizer


def _save_wordpiece(vocabulary, directory, model_type):
  if model_type != 'bert':
    raise UserError(f'A WordPiece vocabulary exports only with BERT (model_type bert), '
                    f'not {model_type!r}; use a SentencePiece vocabulary for {model_type}.')
  with open(os.path.join(directory, 'vocab.txt'), 'w', encoding='utf-8') as f:
    for token in vocabulary.tokens:
      f.write(token + '\n')
  wordpiece_tokenizer(vocabulary).save(os.path.join(directory, 'tokenizer.json'))
  special = {'unk_token': wordpiece.UNK, 'sep_token': wordpiece.SEP, 'pad_token': wordpiece.PAD,
             'cls_token': wordpiece.CLS, 'mask_token': wordpiece.MASK}
  config = dict(special, tokenizer_class='BertTokenizer', do_lower_case=vocabulary.lower_case,
                strip_accents=None, tokenize_chinese_chars=True)
  ids = {'pad_token_id': vocabulary.pad_id, 'unk_token_id': vocabulary.unk_id,
         'cls_token_id': vocabulary.cls_id, 'sep_token_id': vocabulary.sep_id,
         'mask_token_id': vocabulary.mask_id, 'eos_token_id': None, 'bos_token_id': None}
  return ids, config
