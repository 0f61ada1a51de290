"""Test setup: 8 forced host devices on the CPU, set before JAX is imported, so sharded code can be checked
against its single-device reference; the repository root on sys.path so `ap_jax` imports without installing."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)


import pytest  # noqa: E402


@pytest.fixture
def memory_bucket(monkeypatch):
  """`gs://` URLs served by an in-memory object store, with no network: etils.epath's fsspec backend (the one it
  uses without TensorFlow, through gcsfs on a real bucket) gets an fsspec memory filesystem registered for `gs`.
  Like GCS, it has no append (`ap_jax.fs.append_text` must rewrite the object). Yields the store's dict
  (object path -> file) for assertions; `ap_jax.fs` sees real `gs://` strings throughout."""
  import fsspec
  from etils.epath import backend as epath_backend
  from etils.epath import gpath
  from fsspec.implementations.memory import MemoryFileSystem

  class MemoryGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store = {}
    pseudo_dirs = [""]
    root_marker = ""

    def __init__(self, *args, finalize_on_close=None, **kwargs):  # epath passes gcsfs's finalize_on_close
      super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
      path = fsspec.utils.stringify_path(path)
      for prefix in ("gs://", "gcs://"):
        if path.startswith(prefix):
          path = path[len(prefix):]
      return path.rstrip("/")

    def _open(self, path, mode="rb", **kwargs):
      if "a" in mode:
        raise OSError(f"{path}: object stores have no append (mode {mode!r})")
      return super()._open(path, mode, **kwargs)

  MemoryGCS.store.clear()
  registry = sys.modules["fsspec.registry"]._registry  # fsspec.registry itself is a read-only view of it
  for protocol in ("gs", "gcs"):
    monkeypatch.setitem(registry, protocol, MemoryGCS)
  monkeypatch.setenv("EPATH_USE_TF", "false")

  def forget():  # epath caches whether TensorFlow is there and the filesystems it made
    gpath._is_tf_installed.cache_clear()
    type(epath_backend.fsspec_backend)._get_filesystem.cache_clear()

  forget()
  yield MemoryGCS.store
  forget()
