"""Our BERT against Hugging Face's BertForPreTraining, same weights."""

import jax
import numpy as np
import pytest

from flax import linen as nn
from t5x_lite.hf import bert as hf_bert
from t5x_lite.models import encoder as enc

import families
from conftest import require

torch = require('torch')
transformers = require('transformers')

SMALL = families.config('bert', vocab_size=97, emb_dim=32, num_heads=4, mlp_dim=48,
                        max_positions=40)


def hf_config(cfg: enc.BertConfig):
  return transformers.BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.emb_dim,
      num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.mlp_dim, max_position_embeddings=cfg.max_positions,
      type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.layer_norm_eps,
      hidden_act='gelu', hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0, attn_implementation='eager',
      initializer_range=0.2)  # 10x BERT's, so logits are not all near 0


def random_hf_model(cfg: enc.BertConfig, seed: int = 0):
  torch.manual_seed(seed)
  model = transformers.BertForPreTraining(hf_config(cfg)).eval()
  with torch.no_grad():  # non-trivial norms and biases (HF inits them 1 / 0)
    for name, p in model.named_parameters():
      if name.endswith('bias') or 'LayerNorm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def padded_batch(cfg, rng, lengths=(40, 23, 6), length=40):
  b = len(lengths)
  tokens = rng.integers(1, cfg.vocab_size, (b, length)).astype(np.int32)
  segments = np.zeros((b, length), np.int32)
  targets = rng.integers(1, cfg.vocab_size, (b, length)).astype(np.int32)
  weights = (rng.random((b, length)) < 0.3).astype(np.int32)
  for i, n in enumerate(lengths):
    tokens[i, n:] = 0
    segments[i, n // 2:n] = 1
    weights[i, n:] = 0
  weights[:, 1] = 1
  return dict(input_tokens=tokens, segment_ids=segments, targets=targets,
              loss_weights=weights,
              next_sentence_label=np.arange(b, dtype=np.int32) % 2)


def test_bert_base_param_count_matches_hf():
  model = enc.EncoderModel(enc.BERT_BASE)
  shapes = jax.eval_shape(model.init, jax.random.key(0), model.dummy_batch(1, 8))
  ours = sum(int(np.prod(x.shape))
             for x in jax.tree_util.tree_leaves(nn.unbox(shapes)['params']))
  with torch.device('meta'):
    hf = transformers.BertForPreTraining(transformers.BertConfig())
  # parameters() lists tied tensors (decoder weight / bias) once.
  assert ours == sum(p.numel() for p in hf.parameters()) == 110_106_428


def test_logits_and_loss_match_hf(kernels):
  cfg = SMALL
  hf = random_hf_model(cfg)
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  params = hf_bert.from_hf_state_dict(state, cfg)
  model = enc.EncoderModel(cfg)
  batch = padded_batch(cfg, np.random.default_rng(0))

  ours_mlm = np.asarray(model.logits(params, batch))
  ours_nsp = np.asarray(model.nsp_logits(params, batch))
  loss, metrics = model.loss_fn(params, batch, None)

  labels = torch.from_numpy(batch['targets']).long()
  labels[torch.from_numpy(batch['loss_weights']) == 0] = -100
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(batch['input_tokens']).long(),
             token_type_ids=torch.from_numpy(batch['segment_ids']).long(),
             attention_mask=torch.from_numpy(batch['input_tokens'] > 0).long(),
             labels=labels,
             next_sentence_label=torch.from_numpy(
                 batch['next_sentence_label']).long())
  theirs_mlm = out.prediction_logits.numpy()
  theirs_nsp = out.seq_relationship_logits.numpy()

  assert ours_mlm.shape == theirs_mlm.shape == (3, 40, cfg.vocab_size)
  assert ours_nsp.shape == theirs_nsp.shape == (3, 2)
  valid = batch['input_tokens'] > 0
  np.testing.assert_allclose(ours_mlm[valid], theirs_mlm[valid], atol=1e-4)
  # Padding only masks keys (as in HF), so padded rows agree as well.
  np.testing.assert_allclose(ours_mlm, theirs_mlm, atol=1e-4)
  np.testing.assert_allclose(ours_nsp, theirs_nsp, atol=1e-4)
  np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)
  mlm_only = torch.nn.functional.cross_entropy(
      out.prediction_logits.reshape(-1, cfg.vocab_size), labels.reshape(-1))
  np.testing.assert_allclose(float(metrics['mlm_loss']), float(mlm_only),
                             rtol=1e-5)


def test_round_trip_to_hf_state_dict():
  cfg = SMALL
  model = enc.EncoderModel(cfg)
  params = nn.unbox(model.init(jax.random.key(3), model.dummy_batch(2, 8)))
  params = params['params']
  state = hf_bert.to_hf_state_dict(params, cfg)
  hf = transformers.BertForPreTraining(hf_config(cfg)).eval()
  hf_names = set(hf.state_dict())
  assert set(state) <= hf_names, set(state) - hf_names
  hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()},
                     strict=False)
  back = hf_bert.from_hf_state_dict(
      {k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back,
                         jax.tree_util.tree_map(np.asarray, params))


def test_mismatched_config_is_reported():
  state = {k: v.numpy() for k, v in random_hf_model(SMALL).state_dict().items()}
  wrong = enc.BertConfig(**{**SMALL.__dict__, 'mlp_dim': 64})
  with pytest.raises(ValueError, match='intermediate.dense'):
    hf_bert.from_hf_state_dict(state, wrong)
  del state['cls.seq_relationship.bias']
  with pytest.raises(KeyError, match='seq_relationship'):
    hf_bert.from_hf_state_dict(state, SMALL)
