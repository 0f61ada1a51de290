"""Names of pytree key paths (ap_jax.pytree): one rule for the state's shardings, the decay mask and checksums."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ap_jax import pytree
from ap_jax.train import checkpoint as checkpoint_lib
from ap_jax.train import optim as optim_lib


class _Moments(NamedTuple):
  mu: dict
  count: jax.Array


def test_path_names_name_dict_keys_attributes_and_indices():
  tree = dict(params=dict(blocks=dict(attn=dict(q=jnp.zeros((2, 3))))), opt=[_Moments(mu=dict(w=1.0), count=2)])
  names = [pytree.path_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert names == [("opt", "0", "mu", "w"), ("opt", "0", "count"), ("params", "blocks", "attn", "q")]
  path = jax.tree_util.tree_flatten_with_path(tree)[0][-1][0]
  assert pytree.path_name(path) == "params/blocks/attn/q"
  assert pytree.key_name("plain") == "plain"  # a key of no known kind is named by its text
  # The checksums written with a checkpoint are keyed by these names.
  assert set(checkpoint_lib.state_checksums(tree)) == {"opt/0/mu/w", "opt/0/count", "params/blocks/attn/q"}


def test_decay_mask_spares_norms_biases_gains_and_vectors_also_in_stacked_blocks():
  params = dict(embed=dict(kernel=jnp.zeros((4, 8)), bias=jnp.zeros((8,))),
                blocks=dict(mlp=dict(kernel=jnp.zeros((2, 8, 8)), bias=jnp.zeros((2, 8))),
                            norm=dict(scale=jnp.zeros((2, 8))), gains=jnp.zeros((2, 8))),
                head=[jnp.zeros((8, 4)), jnp.zeros((4,))])
  mask = optim_lib.decay_mask(params)
  assert mask == dict(embed=dict(kernel=True, bias=False),
                      blocks=dict(mlp=dict(kernel=True, bias=False), norm=dict(scale=False), gains=False),
                      head=[True, False])
  optax.adamw(1e-3, mask=optim_lib.decay_mask).init(params)  # a mask optax takes
