"""`ap-jax bench attention`: the model's masked attention by XLA against cuDNN's fused kernel (GPU only; not in
`all`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ap_jax.bench import common


def attention_benchmark(*, batch: int = 8, length: int = 1024, heads: int = 12, head_dim: int = 128,
                        dtype: str = "bfloat16", repeats: int = 10) -> dict:
  """The masked attention of the model (subject-isolated layout, padded slots) by XLA against cuDNN's fused kernel
  (`jax.nn.dot_product_attention(implementation='cudnn')`, GPU only): the largest difference and each one's time.
  Off a GPU, or where cuDNN refuses the shapes, the cuDNN entries say why."""
  from ap_jax.model import attention as attn_lib

  rng = np.random.default_rng(0)
  slots, frames = 8, 5
  video = max(1, length // frames - slots)
  layout = attn_lib.self_attention_layout(frames, video, slots)
  player_mask = jnp.asarray(np.arange(slots)[None] < rng.integers(2, slots + 1, (batch, 1)))
  seg = attn_lib.segment_ids(layout, player_mask)
  mask = attn_lib.Mask(attn_lib.static_mask(layout, layout, subject_isolation=True), seg, seg)
  n = len(layout)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, n, heads, head_dim)), dtype) for _ in range(3))
  xla = jax.jit(lambda q, k, v: attn_lib.attention(q, k, v, mask, "xla"))
  cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask.dense()[:, None],
                                                               implementation="cudnn"))
  want = jax.block_until_ready(xla(q, k, v))
  out = dict(batch=batch, length=n, heads=heads, head_dim=head_dim, dtype=dtype,
             xla_s=common.median_seconds(lambda: jax.block_until_ready(xla(q, k, v)), repeats=repeats))
  try:
    got = jax.block_until_ready(cudnn(q, k, v))
  except Exception as e:  # no GPU, or shapes cuDNN does not take
    out.update(cudnn_s=None, max_abs_diff=None, cudnn_error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return out
  out.update(cudnn_s=common.median_seconds(lambda: jax.block_until_ready(cudnn(q, k, v)), repeats=repeats),
             max_abs_diff=float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))))
  return out
