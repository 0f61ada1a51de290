"""Writing a rollouts dataset atomically, and opening its splits for reading with clear errors.

A dataset directory holds what TFDS writes for one built config: `dataset_info.json`, `features.json` and one
or more `ap_jax_rollouts-<split>.array_record-NNNNN-of-MMMMM` files per split. `build` writes everything into a
sibling temporary directory and renames it into place only when every split is complete, so an interrupted run
leaves no directory that a reader could take for a whole dataset (at worst a `*.incomplete-*` directory, which
readers refuse and the next build on the same host removes once the process that wrote it is gone).

`out_dir` and the readers' `path` may be `gs://` URLs (`ap_jax.fs`). ArrayRecord files are read there by
array_record's own GCS reader; they cannot be written there, so a build for a URL runs in a local temporary folder
and uploads the result with `dataset_info.json` last: readers require that file, so none takes a part-uploaded
folder for a dataset.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import shlex
import shutil
import socket
import tempfile
import uuid
from typing import Any


from ap_jax import fs
from ap_jax.data import tfds_builder

log = logging.getLogger(__name__)

INFO_FILE = "dataset_info.json"
OWNER_FILE = "ap_jax_build_owner.json"  # host and pid of the process writing an `.incomplete-*` directory


class DatasetError(ValueError):
  """A dataset directory or file that cannot be read as an ap_jax rollouts dataset."""


def build(spec: tfds_builder.GenerationSpec, out_dir: str, *, overwrite: bool = False,
          beam_runner: str | None = None, beam_options: str = "") -> str:
  """Generates the dataset described by `spec` into `out_dir` (atomically). Returns `out_dir`. With `beam_runner`
  (e.g. `DirectRunner`; needs the `beam` extra) TFDS runs the generation as an Apache Beam pipeline, with
  `beam_options` the runner's flags (`--direct_num_workers=4 --direct_running_mode=multi_processing`)."""

  spec = tfds_builder.check_spec(spec)
  if fs.is_url(out_dir):
    return _build_and_upload(spec, out_dir, overwrite=overwrite, beam_runner=beam_runner, beam_options=beam_options)
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} already exists; pass --overwrite to replace it")
  if os.path.exists(out_dir) and not _replaceable(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not an ap_jax dataset (no {INFO_FILE}); --overwrite replaces "
                          "only a dataset (or an empty directory): remove it yourself or choose another --out")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp_root = f"{out_dir}.incomplete-{uuid.uuid4().hex[:8]}"
  os.makedirs(tmp_root)
  with open(os.path.join(tmp_root, OWNER_FILE), "w") as f:
    json.dump(dict(host=socket.gethostname(), pid=os.getpid()), f)
  for stale in glob.glob(out_dir + ".incomplete-*"):
    if stale != tmp_root and _abandoned(stale):
      log.info("removing %s left by an interrupted build", stale)
      shutil.rmtree(stale, ignore_errors=True)
  try:
    builder = tfds_builder.ApJaxRollouts(
        data_dir=tmp_root, config=tfds_builder.config_name_for(spec), spec=spec, file_format="array_record",
        beam=beam_runner is not None)
    builder.download_and_prepare(download_dir=os.path.join(tmp_root, "downloads"),
                                 download_config=_download_config(beam_runner, beam_options))
    built = builder.data_dir
    if overwrite and os.path.exists(out_dir):
      trash = f"{out_dir}.old-{uuid.uuid4().hex[:8]}"
      os.rename(out_dir, trash)
      os.rename(built, out_dir)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.rename(built, out_dir)  # atomic on one filesystem: the dataset appears whole or not at all
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  return out_dir


def _download_config(beam_runner: str | None, beam_options: str):
  import tensorflow_datasets as tfds

  if beam_runner is None:
    return None
  try:
    from apache_beam.options.pipeline_options import PipelineOptions
  except ImportError as e:
    raise ImportError(f"beam runner {beam_runner!r}: Apache Beam is not installed; pip install -e '.[beam]'") from e
  return tfds.download.DownloadConfig(
      beam_options=PipelineOptions(shlex.split(beam_options) + [f"--runner={beam_runner}"]))


def _build_and_upload(spec: tfds_builder.GenerationSpec, url: str, *, overwrite: bool, **beam) -> str:
  """`build` for an object-store URL: built locally (ArrayRecord writes local files only), then uploaded with
  `dataset_info.json` last. An overwritten dataset loses its `dataset_info.json` first, so no reader mixes the two."""
  url = url.rstrip("/")
  if fs.exists(url) and not overwrite:
    raise FileExistsError(f"{url} already exists; pass --overwrite to replace it")
  if fs.exists(url) and not _replaceable(url):
    raise FileExistsError(f"{url} exists and is not an ap_jax dataset (no {INFO_FILE}); --overwrite replaces "
                          "only a dataset (or an empty folder): remove it yourself or choose another --out")
  local_root = tempfile.mkdtemp(prefix="ap_jax_dataset-")
  try:
    local = build(spec, os.path.join(local_root, fs.basename(url)), **beam)
    if fs.exists(url):
      info = fs.join(url, INFO_FILE)
      if fs.exists(info):
        fs.as_path(info).unlink()
      fs.rmtree(url)
    log.info("uploading the dataset to %s", url)
    fs.upload_tree(local, url, last=(INFO_FILE,))
  finally:
    shutil.rmtree(local_root, ignore_errors=True)
  return url


def _replaceable(path: str) -> bool:
  """--overwrite replaces a dataset or an empty directory, never a plain file or a directory of other things."""
  if not fs.isdir(path):
    return False
  return fs.exists(fs.join(path, INFO_FILE)) or not fs.listdir(path)


def _abandoned(tmp_dir: str) -> bool:
  """Whether an `.incomplete-*` directory was left by a build that died (its process, on this host, is gone), and
  not one that another process is writing right now (several hosts may build the same dataset at once)."""
  try:
    with open(os.path.join(tmp_dir, OWNER_FILE)) as f:
      owner = json.load(f)
  except (OSError, ValueError):
    return False  # no readable owner yet: possibly being created this instant; leave it
  if owner.get("host") != socket.gethostname():
    return False
  try:
    os.kill(int(owner["pid"]), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, KeyError, ValueError, TypeError):
    return False
  return False


@dataclasses.dataclass
class DatasetInfo:
  """What a reader needs to know about a built dataset, from its `dataset_info.json`."""

  path: str
  config_name: str
  generation: dict[str, Any]
  split_files: dict[str, list[tuple[str, int]]]  # split -> [(file path, records)]

  @property
  def steps(self) -> int:
    return int(self.generation["steps"])

  def num_episodes(self, split: str) -> int:
    return sum(n for _, n in self.split_files[split])


def read_info(path: str) -> DatasetInfo:
  """Reads and checks a dataset directory's metadata; raises DatasetError naming what is wrong."""
  info_path = fs.join(path, INFO_FILE)
  if not fs.isdir(path):
    raise DatasetError(f"dataset directory {path} does not exist")
  if ".incomplete-" in fs.basename(path):
    raise DatasetError(f"{path} is an unfinished build (interrupted); rebuild it with `ap-jax data`")
  if not fs.exists(info_path):
    raise DatasetError(
        f"{path} is not an ap_jax dataset: it has no {INFO_FILE} (build one with `ap-jax data --out {path}`)")
  try:
    info = json.loads(fs.read_text(info_path))
  except json.JSONDecodeError as e:
    raise DatasetError(f"{info_path} is not valid JSON ({e}); the dataset is damaged, rebuild it") from e
  if info.get("name") != "ap_jax_rollouts":
    raise DatasetError(f"{path} holds TFDS dataset {info.get('name')!r}, expected 'ap_jax_rollouts'")
  generation = info.get("metadata", {}).get("generation", {}) if isinstance(info.get("metadata"), dict) else {}
  if not generation:
    md_path = fs.join(path, "metadata.json")
    if fs.exists(md_path):
      generation = json.loads(fs.read_text(md_path)).get("generation", {})
  split_files: dict[str, list[tuple[str, int]]] = {}
  for split in info.get("splits", []):
    name = split["name"]
    template = split.get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
    lengths = [int(n) for n in split.get("shardLengths", [])]
    files = []
    for shard, n in enumerate(lengths):
      fname = (template.replace("{DATASET}", "ap_jax_rollouts").replace("{SPLIT}", name)
               .replace("{FILEFORMAT}", "array_record")
               .replace("{SHARD_X_OF_Y}", f"{shard:05d}-of-{len(lengths):05d}"))
      files.append((fs.join(path, fname), n))
    split_files[name] = files
  return DatasetInfo(path=path, config_name=info.get("configName", ""), generation=generation,
                     split_files=split_files)


def check_files(info: DatasetInfo, split: str) -> None:
  """Checks that each ArrayRecord file of a split exists and holds the records the metadata promises."""
  from array_record.python import array_record_module

  if split not in info.split_files:
    raise DatasetError(f"split {split!r} is not in {info.path}: expected one of {sorted(info.split_files)}")
  for path, expected in info.split_files[split]:
    if not fs.exists(path):
      raise DatasetError(f"ArrayRecord file {path} is missing (split {split!r} expects {expected} records in it)")
    try:
      reader = array_record_module.ArrayRecordReader(path)
      count = reader.num_records()
      reader.close()
    except Exception as e:  # array_record raises RuntimeError/ValueError variants on damaged files
      raise DatasetError(f"ArrayRecord file {path} is corrupt or truncated: {e}") from e
    if count != expected:
      raise DatasetError(f"ArrayRecord file {path} holds {count} records, but the dataset metadata says {expected}")


class EpisodeSource:
  """A random-access source of stored episodes (Grain's `RandomAccessDataSource` protocol).

  Decoding errors are re-raised naming the split's files, so a damaged record is traceable.
  """

  def __init__(self, path: str, split: str):
    import tensorflow_datasets as tfds

    self.info = read_info(path)
    check_files(self.info, split)
    self.split = split
    self._source = tfds.builder_from_directory(path).as_data_source(split)
    self._len = len(self._source)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._len:
      raise IndexError(f"episode index {index} out of range for split {self.split!r} with {self._len} episodes")
    try:
      record = self._source[int(index)]
    except Exception as e:
      files = ", ".join(p for p, _ in self.info.split_files[self.split])
      raise DatasetError(f"cannot decode episode {index} of split {self.split!r} in {files}: {e}") from e
    return _decode(record)

  def __repr__(self) -> str:
    return f"EpisodeSource({self.info.path!r}, split={self.split!r}, episodes={self._len})"


def _decode(record: dict[str, Any]) -> dict[str, Any]:
  out = dict(record)
  for key in ("source", "substrate"):
    if isinstance(out[key], bytes):
      out[key] = out[key].decode()
  out["seed"] = int(out["seed"])
  out["cell_size"] = int(out["cell_size"])
  return out


def open_split(path: str, split: str = "train") -> EpisodeSource:
  return EpisodeSource(path, split)
