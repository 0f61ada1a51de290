"""argparse types the commands share."""

from __future__ import annotations

import argparse


def players(text: str) -> tuple[int, int]:
  try:
    if "-" in text:
      lo, hi = (int(v) for v in text.split("-", 1))
    else:
      lo = hi = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"--players {text!r}: expected MIN-MAX (e.g. 2-4) or a single count") from None
  return lo, hi


def hw(text: str) -> tuple[int, int]:
  try:
    parts = [int(v) for v in text.lower().split("x")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected HxW (e.g. 8x8) or one number") from None
  if len(parts) == 1:
    parts = parts * 2
  if len(parts) != 2 or min(parts) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: expected HxW with positive sizes")
  return parts[0], parts[1]
