"""Results as files and tables: JSON (numpy values made plain, written atomically) and the Markdown tables that
`ap-jax eval`, the demo and `ap-jax compare` print."""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from ap_jax import fs


def to_json(obj: Any) -> Any:
  """numpy scalars and arrays -> plain JSON values (NaN -> null)."""
  if isinstance(obj, dict):
    return {str(k): to_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_json(obj.tolist())
  if isinstance(obj, (np.floating, float)):
    return None if not np.isfinite(obj) else float(obj)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, np.bool_):
    return bool(obj)
  return obj


def write_json(obj: Any, path: str) -> str:
  """`to_json(obj)` written to `path` (local, or a `gs://` URL) atomically (`ap_jax.fs.write_atomic`); returns the
  path."""
  return fs.write_atomic(path, json.dumps(to_json(obj), indent=2))


_COLUMNS = (("MA", "movement_accuracy", "{:.3f}"), ("SA", "state_accuracy", "{:.3f}"),
            ("SP", "subject_preservation", "{:.3f}"), ("interact", "interact_accuracy", "{:.3f}"),
            ("track px", "tracking_error_px", "{:.2f}"),
            ("extra", "extra_players", "{:.3f}"), ("PSNR dB", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.3f}"))


def _row(label: str, row: Mapping[str, Any]) -> str:
  cells = [label] + [("-" if row.get(key) is None else fmt.format(row[key])) for _, key, fmt in _COLUMNS]
  return "| " + " | ".join(cells + [str(row["player_steps"])]) + " |"


def markdown_table(results: Mapping[str, Any]) -> str:
  """The results as Markdown: one row for all rollouts, then one per substrate (when several), per player count and
  per rollout step. MA = movement accuracy, SA = state accuracy, SP = subject preservation, interact = INTERACT
  effect accuracy, extra = frames with a foreign player."""
  header = "| | " + " | ".join(name for name, _, _ in _COLUMNS) + " | player-steps |"
  lines = [header, "|" + "---|" * (len(_COLUMNS) + 2), _row("all", results)]
  by_substrate = results.get("by_substrate", {})
  if len(by_substrate) > 1 or "meltingpot" in results.get("sources", ()):
    lines += [_row(name, row) for name, row in by_substrate.items()]
  lines += [_row(f"{n} players", row) for n, row in results["by_players"].items()]
  lines += [_row(f"step {t}", row) for t, row in results["by_step"].items()]
  if "detector" in results:
    det = results["detector"]
    lines.append("")
    acc = "n/a" if det.get("player_accuracy") is None else f"{det['player_accuracy']:.4f}"
    lines.append(f"Detector on real frames: {acc} of {det['player_instances']} player instances exact (cell and "
                 f"facing); false detections in {det['false_detections']:.4f} of frames.")
    skipped = det.get("skipped_instances", 0)
    if skipped:
      lines.append(f"Not scored: {skipped} instances of players drawn alike ("
                   + "; ".join(f"{name}: players {row['groups']}" for name, row in det.get("by_substrate", {}).items()
                               if row.get("groups")) + ").")
    for name, row in det.get("by_substrate", {}).items():
      if row.get("facing_unreadable"):
        lines.append(f"{name}: facing cannot be read for players {row['facing_unreadable']}; their movement is "
                     "scored by the change of cell.")
  return "\n".join(lines)


def comparison_markdown(table: dict[str, Any], eval_players: tuple[int, int], train_players: tuple[int, int]) -> str:
  """`ap-jax compare`'s table (comparison.md): one row per variant (and one for holding the initial frame), the
  Melting Pot test split and held-out substrates when scored, and movement accuracy by player count."""
  keys = ("movement_accuracy", "subject_preservation", "tracking_error_px", "psnr")

  def fmt(value):
    return "-" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"

  lines = ["| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, res in table.items():
    lines.append(f"| {name} | " + " | ".join(fmt(res.get(k)) for k in keys) + " |")
  hold = next((res["baselines"]["hold_initial_frame"] for res in table.values() if "baselines" in res), None)
  if hold is not None:  # the same cases for every variant: one row
    lines.append("| (hold the initial frame) | " + " | ".join(fmt(hold.get(k)) for k in keys) + " |")
  for key, title in (("test_split", "The training substrates' test split"),
                     ("heldout", "Substrates held out of training")):  # Melting Pot
    if not any(key in res for res in table.values()):
      continue
    lines += ["", f"{title}:", "", "| variant | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, res in table.items():
      if key in res:
        lines.append(f"| {name} | " + " | ".join(fmt(res[key].get(k)) for k in keys) + " |")
    hold = next(res[key]["baselines"]["hold_initial_frame"] for res in table.values() if key in res)
    lines.append("| (hold the initial frame) | " + " | ".join(fmt(hold.get(k)) for k in keys) + " |")
  counts = list(range(eval_players[0], eval_players[1] + 1))
  lines += ["", f"Movement accuracy by number of players (trained on {train_players[0]}-{train_players[1]}):", "",
            "| variant | " + " | ".join(str(n) for n in counts) + " |", "|---|" + "---|" * len(counts)]
  for name, res in table.items():
    by = res.get("by_players", {})
    lines.append(f"| {name} | " + " | ".join(fmt(by.get(str(n), {}).get("movement_accuracy")) for n in counts)
                 + " |")
  return "\n".join(lines) + "\n"
