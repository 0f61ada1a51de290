"""Paths that are local or object-store URLs (`gs://BUCKET/...`, `s3://...`): one set of file operations for both.

Local paths keep plain `os` operations (an atomic write is a temporary file in the same folder, then `os.replace`).
URLs go through `etils.epath`, which uses `tf.io.gfile` when TensorFlow is installed and fsspec otherwise (gcsfs
for `gs://`: the `gcs` extra). An object store publishes an object whole when its upload completes, so a write to a
URL is atomic without a rename (and a rename there is a copy and a delete, which would add nothing). Object stores
have no append: `append_text` rewrites the object, which is fine for the small files it is used for (metrics.jsonl).

Orbax reads and writes checkpoints under a `gs://` workdir itself (TensorStore's GCS driver); ArrayRecord files are
read from `gs://` by array_record's own reader (riegeli's GcsReader, array_record >= 0.8) but written only locally,
so `ap-jax data --out gs://...` builds in a local temporary folder and uploads (`upload_tree`).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import Iterator

from etils import epath


def is_url(path) -> bool:
  """Whether `path` names an object in a store (`gs://...`) rather than a local file."""
  return "://" in os.fspath(path)


def as_path(path) -> epath.Path:
  return epath.Path(path)


def absolute(path: str) -> str:
  """A local path made absolute; a URL as it is (`os.path.abspath` would turn `gs://b/x` into `$PWD/gs:/b/x`)."""
  return os.fspath(path) if is_url(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
  base = os.fspath(base)
  return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def dirname(path: str) -> str:
  return posixpath.dirname(os.fspath(path).rstrip("/")) if is_url(path) else os.path.dirname(os.path.abspath(path))


def basename(path: str) -> str:
  return posixpath.basename(os.fspath(path).rstrip("/")) if is_url(path) else os.path.basename(path)


def exists(path: str) -> bool:
  return as_path(path).exists() if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return as_path(path).is_dir() if is_url(path) else os.path.isdir(path)


def makedirs(path: str) -> None:
  """Creates a folder and its parents (on an object store, a placeholder at most: folders are name prefixes)."""
  if is_url(path):
    as_path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
  """The names (not paths) in a folder."""
  return [p.name for p in as_path(path).iterdir()] if is_url(path) else os.listdir(path)


def glob(pattern: str) -> list[str]:
  """Paths matching a pattern whose wildcards are in the last component."""
  if not is_url(pattern):
    import glob as glob_lib

    return glob_lib.glob(pattern)
  folder, name = posixpath.split(pattern)
  return [os.fspath(p) for p in as_path(folder).glob(name)] if exists(folder) else []


def rmtree(path: str) -> None:
  """Removes a folder and everything in it; a missing folder is not an error."""
  if is_url(path):
    if exists(path):
      as_path(path).rmtree()
  else:
    shutil.rmtree(path, ignore_errors=True)


def rename(src: str, dst: str) -> None:
  """Moves a file or folder. Atomic for local paths on one filesystem; on an object store a folder moves object by
  object (copy, then delete), so callers never rely on that being atomic there."""
  if is_url(src) or is_url(dst):
    as_path(src).rename(dst)
  else:
    os.rename(src, dst)


def mtime(path: str) -> float:
  return float(as_path(path).stat().mtime) if is_url(path) else os.path.getmtime(path)


def read_text(path: str) -> str:
  if is_url(path):
    return as_path(path).read_text()
  with open(path) as f:
    return f.read()


def read_bytes(path: str) -> bytes:
  if is_url(path):
    return as_path(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def write_atomic(path: str, data: str | bytes) -> str:
  """Writes `data` so that readers see the old file or the new one, never a part: locally a temporary file in the
  same folder renamed over `path`; on an object store the upload itself (the object appears when complete).
  Creates the folder. Returns `path`."""
  mode = "w" if isinstance(data, str) else "wb"
  if is_url(path):
    makedirs(dirname(path))
    with as_path(path).open(mode) as f:
      f.write(data)
    return path
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    with open(tmp, mode) as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def append_text(path: str, text: str) -> None:
  """Appends to a text file. An object store has no append: the object is read and written back whole (atomically,
  as `write_atomic`), so keep such files small."""
  if is_url(path):
    old = read_text(path) if exists(path) else ""
    write_atomic(path, old + text)
  else:
    with open(path, "a") as f:
      f.write(text)


@contextlib.contextmanager
def local_file(path: str, suffix: str = "") -> Iterator[str]:
  """For writers that need a real local file (ffmpeg, a GIF encoder): yields `path` itself when it is local, or a
  temporary local file that is uploaded to `path` once the block ends without an error."""
  if not is_url(path):
    yield path
    return
  fd, tmp = tempfile.mkstemp(suffix=suffix or posixpath.splitext(path)[1])
  os.close(fd)
  try:
    yield tmp
    upload_file(tmp, path)
  finally:
    os.remove(tmp)


def upload_file(local: str, dst: str) -> None:
  with open(local, "rb") as f:
    write_atomic(dst, f.read())


def upload_tree(local_dir: str, dst_dir: str, last: tuple[str, ...] = ()) -> None:
  """Copies a local folder to `dst_dir` file by file; the files named in `last` (relative paths) go after all the
  others, so a reader that waits for them (a dataset's `dataset_info.json`) never sees a part-copied folder."""
  files = []
  for root, _, names in os.walk(local_dir):
    files += [os.path.relpath(os.path.join(root, n), local_dir) for n in names]
  for rel in sorted(files, key=lambda r: (r in last, r)):
    upload_file(os.path.join(local_dir, rel), join(dst_dir, *rel.split(os.sep)))


def register_tensorboard_writer(logdir: str) -> None:
  """tensorboardX writes event files with `open()` unless a writer is registered for the URL's scheme (its own
  `gs` writer needs google-cloud-storage and is replaced here): event files under a URL go through epath."""
  if not is_url(logdir):
    return
  from tensorboardX import record_writer

  record_writer.register_writer_factory(os.fspath(logdir).split("://")[0], _EpathWriterFactory())


class _EpathWriterFactory:

  def open(self, path: str):
    return _ObjectWriter(path)

  def directory_check(self, path: str) -> None:
    makedirs(path)


class _ObjectWriter:
  """An event file on an object store: kept in memory and uploaded whole at each flush (every `flush_secs`), so
  TensorBoard sees the scalars during the run on every backend (a streaming upload shows nothing before close)."""

  def __init__(self, path: str):
    self.path = path
    self.data = bytearray()

  def write(self, data: bytes) -> None:
    self.data += data

  def flush(self) -> None:
    write_atomic(self.path, bytes(self.data))

  def close(self) -> None:
    self.flush()
