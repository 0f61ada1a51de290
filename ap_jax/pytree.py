"""Names of pytree key paths (`jax.tree_util.tree_flatten_with_path`): one rule for the train state's shardings,
the weight-decay mask and the checkpoint checksums.

A key's name is what it holds: a dict key, an attribute name or a sequence index, as text; any other key is
named by its `str`. `path_name` joins them with '/' (`params/blocks/attn/q`).
"""

from __future__ import annotations

from typing import Any, Sequence


def key_name(key: Any) -> str:
  """The name of one key of a path: DictKey.key, GetAttrKey.name, SequenceKey.idx (FlattenedIndexKey.key)."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """('params', 'blocks', 'attn', 'q') for a key path."""
  return tuple(key_name(k) for k in path)


def path_name(path: Sequence[Any]) -> str:
  """'params/blocks/attn/q' for a key path."""
  return "/".join(path_names(path))
