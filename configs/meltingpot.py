"""ActionParty on Melting Pot rollouts: trained on a named set of substrates, evaluated on substrates held out.

The config names its substrates; the dataset is generated into the cache on first use (as the built-in game's
is), and so is the held-out substrates' dataset the first time `ap-jax eval --heldout` asks for it:

  ap-jax train --config meltingpot:autoencoder --workdir runs/mp/ae
  ap-jax train --config meltingpot --workdir runs/mp/dit --config.autoencoder_workdir=runs/mp/ae
  ap-jax eval --workdir runs/mp/dit --split test --episodes 32 --out mp_test.json        # training substrates
  ap-jax eval --workdir runs/mp/dit --heldout --episodes 32 --out mp_heldout.json        # held-out substrates

`ap-jax eval --oracle --data DIR ...` gives the metric pipeline's ceiling on the same episodes. Frames are scored
by detectors learned per substrate (ap_jax/eval/learned_detector.py). The meltingpot extra must be installed.

Arguments (comma-separated after the colon, e.g. `meltingpot:tiny,autoencoder,batch=32`):
- `tiny`: the built-in game's tiny recipe (configs/tiny.py) on the Melting Pot substrates whose maps fit a
  72 x 128 canvas at 8 px per cell: the collaborative_cooking family. Trains on `crowded` (2-7 players) and
  `figure_eight` (2-6), and holds out the five two-player kitchens (`asymmetric`, `circuit`, `cramped`, `forced`,
  `ring`): layouts never seen, same sprites. The autoencoder compresses 2x and trains 4,000 steps (7 min on 2 idle
  cores; research log entries 25 and 30); the denoiser takes patch 4 (a token is a cell), weights the players'
  cells in its loss, predicts each frame as a change from the previous one (entry 31) and rotates each subject
  token by its previous cell as well as its current one (entry 32); README "Melting Pot: trained on some
  substrates, scored on unseen ones".
- default (no `tiny`): the small model on a 256 x 256 canvas (8 px cells for maps up to 32 x 32 cells), the
  paper's setting of 2-7 players padded to 8 slots, on an accelerator or a TPU slice (data parallel).
- `autoencoder` selects that stage; `runlocal` shrinks the run to a smoke test (a few steps and episodes).
- `compress=N` (with `tiny`): the autoencoder's downsampling, 2 (default) or 4 (the built-in game's, patch 2).
- `canvas=HxW` (with `tiny`): the canvas in pixels, default 72x128, which holds every kitchen (at most 9 x 16
  cells) with no black band.
- `patch=N` (with `tiny`): the denoiser's patch size on the latents (default 4 at compress=2, 2 at compress=4: a
  token is one 8 px cell).
- `batch=N`: the global batch size (default 32; with `tiny`, tiny's: 16, 8 with runlocal).
- `steps=N`: the training steps (default 20,000 for the autoencoder, 100,000 for the denoiser, 3 with runlocal;
  with `tiny`: 4,000 / 3,600, 6 with runlocal). `batch` and `steps` win over runlocal.
Override the substrates with `--config.data.substrates=a,b --config.data.heldout_substrates=c,d`.
"""

from ap_jax.model import config as model_config
from ap_jax.train import config_utils
from ap_jax.train.defaults import base_config

# The small model's default: substrates of several families whose maps fit the 256 x 256 canvas at 8 px per
# cell, 2-7 players each, and held-out substrates of families seen in training (new maps and rules, known sprites).
TRAIN_SUBSTRATES = ("clean_up", "commons_harvest__open", "commons_harvest__closed", "territory__inside_out",
                    "prisoners_dilemma_in_the_matrix__arena", "stag_hunt_in_the_matrix__repeated",
                    "predator_prey__open", "collaborative_cooking__crowded")
HELDOUT_SUBSTRATES = ("commons_harvest__partnership", "chicken_in_the_matrix__arena", "predator_prey__orchard",
                      "collaborative_cooking__figure_eight")

TINY_TRAIN_SUBSTRATES = ("collaborative_cooking__crowded", "collaborative_cooking__figure_eight")
TINY_HELDOUT_SUBSTRATES = ("collaborative_cooking__asymmetric", "collaborative_cooking__circuit",
                           "collaborative_cooking__cramped", "collaborative_cooking__forced",
                           "collaborative_cooking__ring")


def _tiny(arg):
  tiny_arg = ",".join(flag for flag in ("autoencoder", "runlocal") if arg[flag])
  c = config_utils.load_config(f"tiny:{tiny_arg}")
  # 8 px cells, as the built-in game's: the kitchens (at most 9 x 16 cells: 72 x 128 px) fit a 72 x 128 canvas
  # unscaled, with no black band (a 128 x 128 canvas was 44% black padding; the autoencoder's ceiling is the same on
  # both: docs/research_log.md entry 30). At 4 px cells the tiny autoencoder loses the players (entry 21).
  c.data.frame_hw = (72, 128)
  # 2x compression, not the built-in game's 4x: Melting Pot's sprites have ears, eyes and outlines, and the
  # reconstructions through 4x latents kept only coloured blobs. Through 2x latents trained 4,000 steps the true
  # frames score SP 0.997 and MA 0.902 (validation; docs/research_log.md entries 25 and 30).
  # `compress=4`: the built-in game's 4x autoencoder (channel_mult (1, 2, 4)).
  if arg.compress not in (2, 4):
    raise ValueError(f"meltingpot:tiny compress={arg.compress}: expected 2 or 4 (the autoencoder's downsampling)")
  c.model.vae.channel_mult = (1, 2) if arg.compress == 2 else (1, 2, 4)
  # A token is one 8 px cell either way (9 x 16 tokens a frame), as on the built-in game: patch 4 on the 2x latents
  # (128 values a token, the width; patch 8 packed 512 into it and the denoiser could not carry the frame through:
  # entries 26 and 28), patch 2 on the 4x latents.
  c.model.dit.patch_size = 4 if arg.compress == 2 else 2
  # The players are a few percent of a textured frame: their cells (where each is and was) weigh 1 + 12 in the
  # video loss (flow.subject_loss_weight; validation movement accuracy 0.147 against 0.120 at 1 + 4 and 0.090
  # unweighted, at the first step 0.477 / 0.337 / 0.140: entry 30).
  if not arg.autoencoder:
    c.model.flow.subject_loss_weight = 12.0
    # The video head predicts the clean frame as the previous frame's latents plus a change (ours; "stay" is the
    # head's zero). Over 3 seeds: validation MA 0.184 against 0.137, SP 0.359 against 0.301, SSIM 0.869 against
    # 0.817, first-step MA higher on every seed; one seed of three ties on MA (entry 31).
    c.model.flow.video_target = "residual"
    # Each subject token is also rotated by its previous frame's cell (ours; rope.py's (t, y, x, y', x')), so the
    # video token a player leaves finds that player's token as locally as the one it arrives at: before, the
    # sprite was drawn at its new cell and left at its old one. Validation MA over seeds 0-4: 0.565 / 0.507 /
    # 0.130 / 0.523 / 0.221 (mean 0.389, against 0.184 for the residual alone over 3); two seeds in five do not
    # learn where the players go at this budget (entry 32); which ones changes with the machine and autoencoder (seed
    # 2 crossed on another: 0.503). Weighting the coordinate loss 10x cost the frame and did not help (entry 33).
    c.model.dit.subject_rope_previous = True
  if arg.canvas is not None:
    c.data.frame_hw = _canvas(arg.canvas)
  if arg.patch is not None:
    c.model.dit.patch_size = arg.patch
  latent_hw = [s // model_config.compression(c.model) for s in c.data.frame_hw]
  if any(s % c.model.dit.patch_size for s in latent_hw):
    raise ValueError(f"meltingpot:tiny canvas {c.data.frame_hw[0]}x{c.data.frame_hw[1]} at compress={arg.compress} "
                     f"gives {latent_hw[0]} x {latent_hw[1]} latents, not a multiple of patch "
                     f"{c.model.dit.patch_size}: expected a canvas in multiples of "
                     f"{model_config.pixels_per_token(c.model)} px")
  if arg.autoencoder and not arg.runlocal:
    c.total_steps = 4000
  c.model.vae.foreground = "subjects"  # the map is textured: weight the players' cells, not "not the median"
  c.model.vae.subject_radius_px = 5.0  # a cell is 8 px: its centre +- 4, and a pixel of margin
  c.data.substrates = TINY_TRAIN_SUBSTRATES
  c.data.heldout_substrates = TINY_HELDOUT_SUBSTRATES
  c.data.heldout_players = (2, 2)  # the held-out kitchens take 1 or 2 players
  c.data.heldout_episodes = 300
  c.data.episodes = 1500
  c.data.players = (2, 7)
  if arg.runlocal:
    c.data.episodes = 12
    c.data.heldout_episodes = 6
  return c


def _canvas(text):
  """`canvas=HxW` as (H, W) in pixels."""
  h, sep, w = text.partition("x")
  if not (sep and h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
    raise ValueError(f"meltingpot:tiny canvas={text!r}: expected HEIGHTxWIDTH in pixels, e.g. canvas=72x128")
  return (int(h), int(w))


def get_config(arg=None):
  arg = config_utils.parse_arg(arg, autoencoder=False, runlocal=False, tiny=False, batch=int, steps=int, compress=2,
                               canvas=str, patch=int)
  if not arg.tiny and (arg.canvas is not None or arg.patch is not None):
    raise ValueError("meltingpot: canvas= and patch= are arguments of the tiny recipe (meltingpot:tiny,...); "
                     "override --config.data.frame_hw and --config.model.dit.patch_size otherwise")
  if arg.tiny:
    c = _tiny(arg)
  else:
    c = base_config("small")
    c.stage = "autoencoder" if arg.autoencoder else "denoiser"
    c.model.dit.dtype = "bfloat16"
    c.data.frame_hw = (256, 256)
    c.data.substrates = TRAIN_SUBSTRATES
    c.data.heldout_substrates = HELDOUT_SUBSTRATES
    c.data.episodes = 5000
    c.data.heldout_episodes = 500
    c.data.players = (2, 7)
    c.data.global_batch_size = 32
    c.total_steps = 20000 if c.stage == "autoencoder" else 100000
    c.checkpoint_every = 1000
    c.log_every = 50
    if arg.runlocal:
      c.model.dit.dtype = "float32"
      c.total_steps = 3
      c.log_every = 1
      c.data.episodes = 12
      c.data.heldout_episodes = 6
      c.data.frame_hw = (64, 64)
  c.data.source = "meltingpot"
  c.data.steps = 16
  if arg.batch is not None:
    c.data.global_batch_size = arg.batch
  if arg.steps is not None:
    c.total_steps = arg.steps
  return c
