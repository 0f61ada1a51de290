"""Evaluation against the true game: a sprite detector, replay of actions in the true game, the metrics
(movement accuracy, subject preservation, tracking error, PSNR, SSIM), the JSON action-file format, and the
cases, runs, videos and result files built on them.

The scoring modules need no trained model: every metric takes generated frames as plain arrays, so the true game's
own frames can be fed in as if generated (the metrics must then be perfect; tests/test_eval.py checks that). Only
`run` generates rollouts (with `ap_jax.sample`); it is not imported here.

  detector      `detect(frames, colors, cell_size)`: each player's identity, cell, facing and count per frame.
  learned_detector  the same for Melting Pot, learned per substrate from labelled true frames
                `meltingpot_detector(substrate, players, canvas_hw)`; says which players cannot be told apart.
  replay        `replay_builtin`, `replay_meltingpot`, `replay_episode`: the true frames and states (Melting Pot:
                with each avatar's visibility) for a seed and an action sequence.
  metrics       per-rollout scores (movement, state and INTERACT accuracy, subject preservation, tracking error,
                PSNR, SSIM); their aggregation by player count and rollout step.
  action_files  `load_action_file(path) -> (actions [T, P], meta)` with errors that name the bad entry.
  cases         `Case` (an initial frame, positions, actions and the true game's replay) from dataset episodes,
                action files, or fresh episodes of chosen player counts.
  run           `evaluate(trained, cases)`: rollouts generated and scored; `oracle`, the hold-the-frame baseline.
  render        a case's rollout as annotated video frames beside the true game.
  report        results as JSON (`write_json`) and Markdown tables (`markdown_table`, `comparison_markdown`).
"""

from ap_jax.eval.action_files import load_action_file, parse_actions
from ap_jax.eval.detector import Detections, detect, detector_accuracy
from ap_jax.eval.metrics import (aggregate, interact_accuracy, movement_accuracy, psnr, score_rollout, ssim,
                                 state_accuracy, subject_preservation, tracking_error_px)
from ap_jax.eval.replay import replay_builtin, replay_episode
from ap_jax.eval.report import markdown_table

__all__ = [
    "Detections", "aggregate", "detect", "detector_accuracy", "interact_accuracy", "load_action_file",
    "markdown_table", "movement_accuracy", "parse_actions", "psnr", "replay_builtin", "replay_episode",
    "score_rollout", "ssim", "state_accuracy", "subject_preservation", "tracking_error_px",
]
