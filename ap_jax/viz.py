"""Pictures and videos people look at: episodes with their labels drawn over, written as MP4 or GIF.

The overlay lets a person check the labels by eye: each player's recorded position is a ring in its colour, its
recorded facing a line from the ring's centre, and the action it takes next is printed under the frame.
"""

from __future__ import annotations

import io
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ap_jax import actions as A
from ap_jax import fs

SHORT_ACTION = {"NOOP": "-", "FORWARD": "FWD", "BACKWARD": "BACK", "STRAFE_LEFT": "STR_L",
                "STRAFE_RIGHT": "STR_R", "TURN_LEFT": "TURN_L", "TURN_RIGHT": "TURN_R", "INTERACT": "ACT"}


def _font(size: int = 11):
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # older Pillow
    return ImageFont.load_default()


def annotate_frame(frame: np.ndarray, positions: np.ndarray, orientations: np.ndarray, colors: np.ndarray,
                   actions: np.ndarray | None, *, scale: int, title: str = "",
                   ok: Sequence[bool | None] | None = None) -> np.ndarray:
  """Draws labels over one frame. frame [H, W, 3] uint8; positions [P, 2] pixels (y, x); orientations [P];
  colors [P, 3]; actions [P] (the action taken from this frame) or None on the last frame; ok[p] marks
  whether player p's action was carried out (green tick / red cross), or None to omit."""
  h, w, _ = frame.shape
  players = positions.shape[0]
  line_h = 13
  legend_rows = (players + 1) // 2
  img = Image.new("RGB", (w * scale, h * scale + line_h * (legend_rows + 1) + 4), (0, 0, 0))
  img.paste(Image.fromarray(np.asarray(frame, np.uint8)).resize((w * scale, h * scale), Image.NEAREST), (0, 0))
  draw = ImageDraw.Draw(img)
  font = _font()
  deltas = A.ORIENTATION_DELTAS
  radius = max(3, scale * 3)
  for p in range(players):
    y, x = positions[p] * scale
    color = tuple(int(c) for c in colors[p])
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], outline=(255, 255, 255), width=2)
    draw.ellipse([x - radius + 2, y - radius + 2, x + radius - 2, y + radius - 2], outline=color, width=1)
    dy, dx = deltas[int(orientations[p])]
    draw.line([x, y, x + dx * radius * 1.6, y + dy * radius * 1.6], fill=(255, 255, 255), width=2)
  top = h * scale + 2
  draw.text((2, top), title, fill=(220, 220, 220), font=font)
  col_w = (w * scale) // 2
  for p in range(players):
    row, col = divmod(p, 2)
    xy = (2 + col * col_w, top + line_h * (row + 1))
    color = tuple(int(c) for c in colors[p])
    draw.rectangle([xy[0], xy[1] + 2, xy[0] + 8, xy[1] + 10], fill=color)
    name = "" if actions is None else SHORT_ACTION[A.ACTION_NAMES[int(actions[p])]]
    draw.text((xy[0] + 12, xy[1]), f"P{p} {A.ORIENTATION_NAMES[int(orientations[p])]} {name}",
              fill=(230, 230, 230), font=font)
    if ok is not None and ok[p] is not None and actions is not None:
      mark_x = xy[0] + col_w - 16
      mark_color = (40, 220, 60) if ok[p] else (230, 40, 40)
      draw.rectangle([mark_x, xy[1] + 2, mark_x + 8, xy[1] + 10], fill=mark_color)
  return np.asarray(img)


def annotate_episode(episode: dict[str, Any], *, scale: int = 4) -> list[np.ndarray]:
  """Annotated frames of a stored episode (the schema of `ap_jax.data.schema`)."""
  frames = np.asarray(episode["frames"])
  actions = np.asarray(episode["actions"])
  out = []
  for t in range(frames.shape[0]):
    title = f"{episode.get('source', '')}/{episode.get('substrate', '')} seed {episode.get('seed', '')} t={t}"
    out.append(annotate_frame(frames[t], np.asarray(episode["positions"])[t], np.asarray(episode["orientations"])[t],
                              np.asarray(episode["colors"]), actions[t] if t < actions.shape[0] else None,
                              scale=scale, title=title))
  return out


def write_video(frames: Sequence[np.ndarray], path: str, fps: float = 4.0) -> str:
  """Writes frames [H, W, 3] uint8 as .mp4 (H.264 via imageio-ffmpeg) or .gif, atomically; `path` may be a
  `gs://` URL (encoded locally, then uploaded)."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".mp4", ".gif"):
    raise ValueError(f"video path {path!r} must end in .mp4 or .gif")
  with fs.local_file(path) as local:
    _write_video_local(frames, local, ext, fps)
  return path


def _write_video_local(frames: Sequence[np.ndarray], path: str, ext: str, fps: float) -> None:
  import imageio.v2 as imageio

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{ext}"
  if ext == ".gif":
    imageio.mimsave(tmp, [np.asarray(f) for f in frames], duration=1.0 / fps, loop=0)
  else:
    # H.264 wants even sizes; pad by one black row/column where needed.
    def even(f):
      f = np.asarray(f)
      return np.pad(f, [(0, f.shape[0] % 2), (0, f.shape[1] % 2), (0, 0)])

    with imageio.get_writer(tmp, fps=fps, codec="libx264", macro_block_size=1, quality=8,
                            ffmpeg_log_level="error", format="FFMPEG") as writer:
      for f in frames:
        writer.append_data(even(f))
  os.replace(tmp, path)


def write_strip(rows: Sequence[Sequence[np.ndarray]], path: str, *, scale: int = 3, gap: int = 2) -> str:
  """Writes a PNG contact sheet, atomically: one row of frames [H, W, 3] uint8 per entry of `rows` (e.g. the true
  game above the generated rollout), frames side by side with `gap` dark pixels between them, scaled up by
  `scale` with nearest-neighbour sampling so pixel-art cells stay sharp."""
  if not rows or any(len(r) != len(rows[0]) for r in rows) or not rows[0]:
    raise ValueError(f"rows must be non-empty and of equal length, got lengths {[len(r) for r in rows]}")
  h, w = np.asarray(rows[0][0]).shape[:2]
  n = len(rows[0])
  sheet = np.full((len(rows) * (h + gap) - gap, n * (w + gap) - gap, 3), 40, np.uint8)
  for i, row in enumerate(rows):
    for j, frame in enumerate(row):
      sheet[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = np.asarray(frame)[..., :3]
  image = Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST)
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return fs.write_atomic(path, buffer.getvalue())
