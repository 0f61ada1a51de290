"""Masks, attention paths and RoPE of ap_jax.model: hand-built references and cross-path agreement."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ap_jax.model import attention as attn_lib
from ap_jax.model import dit
from ap_jax.model import rope as rope_lib


def _reference_self_mask(num_frames, video_per_frame, num_slots, player_mask, isolation):
  """Hand-built, token by token, from the rules in words (attention.py docstring)."""
  tokens = []  # (frame, slot or None)
  for f in range(num_frames):
    tokens += [(f, None)] * video_per_frame + [(f, p) for p in range(num_slots)]
  b = player_mask.shape[0]
  ref = np.zeros((b, len(tokens), len(tokens)), bool)
  for i, (fq, sq) in enumerate(tokens):
    for j, (fk, sk) in enumerate(tokens):
      if fk > fq:
        continue  # no peeking at future frames
      if isolation and sq is not None and sk is not None and sq != sk:
        continue  # subject tokens never see other subjects
      for e in range(b):
        q_pad = sq is not None and not player_mask[e, sq]
        k_pad = sk is not None and not player_mask[e, sk]
        # Real queries see real keys only; a padded query sees only padded keys (its output is discarded).
        ref[e, i, j] = q_pad == k_pad
  return ref


def _reference_cross_mask(num_frames, num_slots, player_mask, masked, frame_wise):
  queries = [(f, p) for f in range(num_frames) for p in range(num_slots)]
  keys = [(f, p) for p in range(num_slots) for f in range(num_frames)]
  b = player_mask.shape[0]
  ref = np.zeros((b, len(queries), len(keys)), bool)
  for i, (fq, pq) in enumerate(queries):
    for j, (fk, pk) in enumerate(keys):
      if (fk != fq) if frame_wise else (fk > fq):
        continue
      if masked and pq != pk:
        continue
      for e in range(b):
        ref[e, i, j] = player_mask[e, pq] == player_mask[e, pk]
  return ref


@pytest.mark.parametrize("isolation", [True, False])
def test_self_mask_equals_hand_built_reference(isolation):
  player_mask = np.array([[True, False, True], [True, True, True]])
  layout = attn_lib.self_attention_layout(3, 4, 3)
  seg = attn_lib.segment_ids(layout, jnp.asarray(player_mask))
  mask = attn_lib.Mask(attn_lib.static_mask(layout, layout, subject_isolation=isolation), seg, seg)
  np.testing.assert_array_equal(np.asarray(mask.dense()), _reference_self_mask(3, 4, 3, player_mask, isolation))


@pytest.mark.parametrize("masked,frame_wise", list(itertools.product([True, False], [True, False])))
def test_cross_mask_equals_hand_built_reference(masked, frame_wise):
  player_mask = np.array([[True, False, True, False], [False, True, True, True]])
  q_layout, k_layout = attn_lib.subject_query_layout(3, 4), attn_lib.action_layout(3, 4)
  mask = attn_lib.Mask(
      attn_lib.static_mask(q_layout, k_layout, frame_wise=frame_wise, same_subject=masked),
      attn_lib.segment_ids(q_layout, jnp.asarray(player_mask)), attn_lib.segment_ids(k_layout, jnp.asarray(player_mask)))
  np.testing.assert_array_equal(np.asarray(mask.dense()), _reference_cross_mask(3, 4, player_mask, masked, frame_wise))


def test_every_query_row_has_a_key():
  # Even with all but one slot padded, no query row is empty (no NaN from an all-masked softmax).
  player_mask = jnp.asarray([[True] + [False] * 7])
  layout = attn_lib.self_attention_layout(2, 4, 8)
  seg = attn_lib.segment_ids(layout, player_mask)
  dense = attn_lib.Mask(attn_lib.static_mask(layout, layout, subject_isolation=True), seg, seg).dense()
  assert bool(jnp.all(jnp.any(dense, axis=-1)))


def _random_problem(rng, batch=2, heads=2, head_dim=32):
  """A random layout (frames, video tokens, slots, padding, switches) and random q/k/v for it."""
  num_frames = int(rng.integers(1, 4))
  video = int(rng.integers(1, 20))
  slots = int(rng.integers(1, 6))
  player_mask = rng.random((batch, slots)) < 0.6
  player_mask[:, 0] = True
  layout = attn_lib.self_attention_layout(num_frames, video, slots)
  seg = attn_lib.segment_ids(layout, jnp.asarray(player_mask))
  mask = attn_lib.Mask(attn_lib.static_mask(layout, layout, subject_isolation=bool(rng.integers(2))), seg, seg)
  length = len(layout)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), jnp.float32) for _ in range(3))
  return q, k, v, mask


def test_splash_representation_equals_dense_on_random_layouts():
  """The splash kernel (Pallas interpret mode on CPU) fed the static mask + segment ids gives the same
  attention as the dense XLA mask and as jax.nn.dot_product_attention."""
  rng = np.random.default_rng(0)
  for _ in range(3):
    q, k, v, mask = _random_problem(rng)
    dense = attn_lib.attention(q, k, v, mask, "xla")
    np.testing.assert_allclose(attn_lib.attention(q, k, v, mask, "cudnn"), dense, atol=2e-5)
    np.testing.assert_allclose(attn_lib.attention(q, k, v, mask, "splash"), dense, atol=2e-5)
    # And the XLA path really applies the mask: the masked result differs from unmasked attention.
    full = jax.nn.dot_product_attention(q, k, v)
    assert float(jnp.max(jnp.abs(full - dense))) > 1e-3


@pytest.mark.tpu
def test_splash_kernel_on_tpu_equals_dense():
  if jax.devices()[0].platform != "tpu":
    pytest.skip("needs a TPU")
  rng = np.random.default_rng(1)
  for _ in range(3):
    q, k, v, mask = _random_problem(rng, head_dim=128)
    np.testing.assert_allclose(attn_lib.attention(q, k, v, mask, "splash"), attn_lib.attention(q, k, v, mask, "xla"),
                               atol=2e-3)


# ---------------------------------------------------------------------------------------------------- RoPE

def _scores(q_vec, q_pos, k_vecs, k_pos, head_dim=32):
  q = rope_lib.apply_rope(q_vec, rope_lib.rope_angles(q_pos, head_dim))
  k = rope_lib.apply_rope(k_vecs, rope_lib.rope_angles(k_pos, head_dim))
  return k @ q


def test_subject_token_scores_like_video_token_at_its_cell():
  """A subject standing on grid cell (i, j) (pixel centre of that cell) gets the rotary position of video token
  (i, j), so with the same content it scores exactly like that token against every video key."""
  grid = (8, 8)
  canvas = (64, 64)  # 8 px per token: VAE 4x times patch 2
  i, j = 5, 2
  pixel_centre = jnp.asarray([8 * i + 4.0, 8 * j + 4.0])
  coords = dit.positions_to_coords(pixel_centre, canvas)
  token_yx = dit.coords_to_token_grid(coords, grid)
  np.testing.assert_allclose(token_yx, [i, j], atol=1e-5)

  rng = np.random.default_rng(0)
  content = jnp.asarray(rng.normal(size=32), jnp.float32)
  keys = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
  ty, tx = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
  key_pos = jnp.asarray(np.stack([np.full(64, 1), ty.ravel(), tx.ravel()], -1), jnp.float32)
  subject_pos = jnp.concatenate([jnp.ones(1), token_yx])
  video_pos = jnp.asarray([1.0, i, j])
  np.testing.assert_allclose(_scores(content, subject_pos, keys, key_pos),
                             _scores(content, video_pos, keys, key_pos), atol=1e-4)


def test_fractional_rope_positions_interpolate():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=32), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 32)), jnp.float32)
  k_pos = jnp.asarray([[0.0, 3.0, 4.0]])
  ys = jnp.linspace(2.0, 3.0, 41)
  s = jnp.stack([_scores(q, jnp.asarray([0.0, y, 4.0]), k, k_pos)[0] for y in ys])
  # Endpoints equal the integer-position scores; in between the score moves smoothly (no rounding to cells).
  s_y2 = _scores(q, jnp.asarray([0.0, 2.0, 4.0]), k, k_pos)[0]
  s_y3 = _scores(q, jnp.asarray([0.0, 3.0, 4.0]), k, k_pos)[0]
  np.testing.assert_allclose([s[0], s[-1]], [s_y2, s_y3], atol=1e-4)
  steps = np.abs(np.diff(np.asarray(s)))
  assert steps.max() < 0.2 * abs(float(s_y3 - s_y2)) + 1e-3, "score jumps between neighbouring fractional positions"
  assert len(np.unique(np.round(np.asarray(s), 5))) > 30, "fractional positions were snapped to a grid"
  # Rotary is relative, for fractional shifts too: shifting both positions by 0.37 keeps the score.
  shift = jnp.asarray([0.0, 0.37, -1.61])
  np.testing.assert_allclose(_scores(q, jnp.asarray([0.0, 2.25, 4.0]) + shift, k, k_pos + shift),
                             _scores(q, jnp.asarray([0.0, 2.25, 4.0]), k, k_pos), atol=1e-4)


def test_rope_split_matches_wan():
  # Wan2.1 with head width 128: t gets 44 dims, y and x 42 each.
  assert rope_lib.rope_split(128) == (44, 42, 42)
  with pytest.raises(ValueError, match="head_dim = 7"):
    rope_lib.rope_split(7)
  # Five positions (t, y, x, y', x'): y and x keep their dims, y' and x' take theirs from t's.
  assert rope_lib.rope_split(128, 5) == (12, 42, 42, 16, 16)
  assert rope_lib.rope_split(32, 5) == (4, 10, 10, 4, 4)
  with pytest.raises(ValueError, match="head_dim = 8, expected an even number >= 16"):
    rope_lib.rope_split(8, 5)
  with pytest.raises(ValueError, match="num_positions = 4"):
    rope_lib.rope_split(32, 4)


def test_five_position_rope_is_relative_in_both_spatial_pairs():
  """(t, y, x, y', x'): the score is unchanged when every position moves by the same amount, and a key's second
  spatial position (a subject's previous cell) changes the score on its own."""
  rng = np.random.default_rng(2)
  q = jnp.asarray(rng.normal(size=32), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 32)), jnp.float32)
  q_pos = jnp.asarray([1.0, 3.0, 5.0, 3.0, 5.0])  # a video token: its own cell twice
  k_pos = jnp.asarray([[1.0, 4.0, 5.0, 3.0, 5.0], [1.0, 4.0, 5.0, 4.0, 5.0], [0.0, 2.5, 7.0, 2.0, 6.5]])
  shift = jnp.asarray([2.0, -1.25, 0.5, -1.25, 0.5])
  np.testing.assert_allclose(_scores(q, q_pos + shift, k, k_pos + shift), _scores(q, q_pos, k, k_pos), atol=1e-4)
  s = _scores(q, q_pos, k, k_pos)
  assert abs(float(s[0] - s[1])) > 1e-3  # same current cell, different previous cell
