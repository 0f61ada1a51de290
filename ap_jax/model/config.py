"""Model configs ("tiny", "small", "base") as ml_collections ConfigDicts; one code path serves all of them.

`get_model_config(name)` returns a ConfigDict with three groups:
  vae   the per-frame convolutional autoencoder (stage 1)
  dit   the latent diffusion transformer and its subject tokens (stage 2), with the baseline/ablation switches
  flow  the rectified-flow schedule, time sampling and loss weights

Sizes (parameter counts from `ap_jax.model.count_params`, FLOPs from `ap_jax.model.flops`) are in the README.
  tiny   64x64 frames -> VAE 4x -> 16x16x8 latents -> patch 2 -> 8x8 tokens per frame (one per 8-px grid
         cell of the built-in game); DiT width 128, 4 blocks, 4 heads. Trains on 2 CPU cores in minutes.
  small  VAE 4x, DiT width 384, 8 blocks, 6 heads: a single-GPU / small-TPU model.
  base   VAE 8x with 16 latent channels (Wan2.1's VAE shape), DiT shaped like Wan2.1-T2V-1.3B: 30 blocks,
         width 1536, 12 heads, MLP 8960.
"""

from __future__ import annotations

import ml_collections

from ap_jax import actions as actions_lib

MODEL_NAMES = ("tiny", "small", "base")


def _vae(channels: int, channel_mult: tuple[int, ...], latent_channels: int, num_res_blocks: int):
  return ml_collections.ConfigDict(dict(
      channels=channels,  # width of the first conv stage
      channel_mult=channel_mult,  # one entry per resolution; compression = 2 ** (len - 1)
      latent_channels=latent_channels,
      num_res_blocks=num_res_blocks,
      norm_groups=8,
      # Reconstruction loss for flat-colour pixel art: L1 (median-seeking, keeps edges and flat colours exact)
      # plus a small MSE term that punishes the rare large errors (a missing sprite) harder.
      l1_weight=1.0,
      mse_weight=0.25,
      # Pixels that differ from the frame's background colour weigh 1 + foreground_weight (sprites are a few
      # percent of a frame; unweighted, the VAE blurs them away first).
      foreground_weight=8.0,
      # What counts as foreground: "colour" (differs from the frame's median colour: sprites on a plain floor) or
      # "subjects" (within subject_radius_px of a real player's position, from the episode's positions: sprites
      # on a textured map, as in Melting Pot, where most of the map differs from the black border's median).
      foreground="colour",
      subject_radius_px=4.0,
      # Per-element KL weight. Small, as in SD / Wan VAEs: we want a well-behaved latent scale, not a prior.
      kl_weight=1e-5,
      # Latents handed to the denoiser are (mean - latent_shift) * latent_scale; set after stage 1 from latent
      # statistics (ap_jax.model.vae.latent_statistics) so the denoiser sees roughly unit variance.
      latent_scale=1.0,
      latent_shift=0.0,
      dtype="float32",
  ))


def _dit(width: int, depth: int, heads: int, mlp: int, patch_size: int):
  return ml_collections.ConfigDict(dict(
      width=width,
      depth=depth,
      heads=heads,
      mlp=mlp,
      patch_size=patch_size,
      freq_dim=256,  # sinusoidal time-embedding width (Wan2.1)
      rope_theta=10000.0,
      coord_freqs=16,  # Fourier features per coordinate for the subject-token embedding
      eps=1e-6,
      # ---- the mechanism and its baseline / ablation switches (PAPER.md "The mechanism")
      subject_tokens=True,  # False: "actions as text" baseline, all players' actions as one global conditioning
      subject_isolation=True,  # subject tokens never attend to other subjects' tokens
      masked_cross_attention=True,  # subject token i reads only player i's actions
      frame_wise=False,  # True: ... and only the action of its own time step
      subject_rope=True,  # subject token's rotary (y, x) = its current noisy coordinates
      # The subject token is also rotated by its previous frame's cell, in rotary pairs of its own (t, y, x, y', x';
      # rope.py), so a video token finds the subject that leaves its cell as locally as the one that arrives
      # (and the subject token finds its own sprite in the previous frame). Ours, a deviation from the paper's
      # one position; needs previous_frame_input. Video tokens sit at their own cell in both. With context tokens
      # the window's first frame has no previous frame: its previous coordinates are zeros, the canvas centre.
      subject_rope_previous=False,
      slot_embedding=False,  # learned per-slot embedding (breaks permutation equivariance; see dit.py)
      # Each frame's video tokens also embed the previous frame's latents (as Wan2.1 image-to-video concatenates
      # its conditioning frame), so copying the unchanged scene is free and learning goes to what changes. Our
      # deviation from the paper, measured as an ablation (docs/research_log.md). Needs chunk-1 sampling.
      # Subject tokens likewise embed the previous frame's coordinates.
      previous_frame_input=False,
      # False: the context frame is not in the token sequence at all; each window holds only frames to generate,
      # which read the frame before them through previous_frame_input alone (channel conditioning, as GameNGen),
      # and every frame's action entry is the action that produces it (no START). Half the tokens of a one-step
      # clip. Our deviation, measured as an ablation (docs/research_log.md). Needs previous_frame_input.
      context_tokens=True,
      # The subject state also carries the player's facing as a unit vector (dy, dx) (N = (-1, 0), E = (0, 1)),
      # denoised with the coordinates: the paper's state is the position alone ("coord tokens"); with actions
      # relative to facing, a token that knows its facing computes its move locally. Our deviation, measured as
      # an ablation (docs/research_log.md). Sampling then needs each player's initial facing.
      state_facing=False,
      # ---- implementation
      attention_impl="xla",  # xla (dense mask, any device) | cudnn (jax.nn.dot_product_attention) | splash (TPU)
      scan_layers=True,
      remat_policy="none",  # none | full | dots_saveable | dots_with_no_batch_dims_saveable
      # Materialize the gradient leaving each LayerNorm (layers.materialized_grad): same values, fewer recomputed
      # fusions on XLA's CPU backend (0.59x step time at the peer's shape, 0.94x for the full tiny model;
      # BENCHMARKS.md). Off by default until measured on GPU and TPU; the tiny config turns it on.
      ln_grad_barrier=False,
      dtype="float32",  # compute dtype; params stay param_dtype
      param_dtype="float32",
  ))


def _flow():
  return ml_collections.ConfigDict(dict(
      shift=3.0,  # Wan-style timestep shift t' = s t / (1 + (s - 1) t): more time at high noise
      time_sampling="logit_normal",  # logit_normal | uniform
      num_context_frames=1,  # clean-ish conditioning frames at the start of each clip
      context_noise_max=0.1,  # context frames get t ~ U[0, context_noise_max] (diffusion forcing, anti-drift)
      independent_frame_times=False,  # True: each target frame draws its own t (full diffusion forcing)
      coord_loss_weight=1.0,
      # Coordinates lead the video in denoising (flow.coord_time): clean once the video reaches t = lead. 0 = the
      # same time for both.
      coord_time_lead=0.0,
      # Source distribution of the coordinates' flow (ours; the paper's reading is "standard"): "standard" draws
      # them from N(0, 1) as the latents; "previous" from N(c, coord_noise_std^2) around c = the coordinates of the
      # last context frame (the state the step starts from), so denoising moves each subject from where it was and
      # its RoPE position starts near its own sprite. coord_noise_std is in normalised units (one built-in cell of
      # 8 px on a 64 px canvas is 0.25).
      coord_prior="standard",
      coord_noise_std=1.0,
      # What the coordinate head predicts: "velocity" (flow matching, as the latents) or "displacement" (ours): the
      # clean state as previous_coords + coord_noise_std * head, trained by MSE in those units, so "stay where you
      # were" is the head's zero and only the move is learned. Needs coord_prior="previous" and
      # dit.previous_frame_input; samplers step the coordinates DDIM-style from the predicted clean state.
      coord_target="velocity",
      # What the video head predicts (ours): "velocity" (flow matching, as Wan2.1) or "residual": the clean frame as
      # previous_latents + head (x-prediction around the previous frame), turned into the velocity
      # (x_t - x0) / max(t, 0.05) that the loss and the samplers read. "Hold the frame" is then the head's zero,
      # the prior a pretrained video model brings to ActionParty and a model trained from scratch lacks. Needs
      # dit.previous_frame_input. A deviation from the paper, measured as one (docs/research_log.md entry 31).
      video_target="velocity",
      # Extra video-loss weight on the latent cells a player occupies in the frame or occupied in the previous
      # frame (dit.subject_region_weight): 1 + this there, 1 elsewhere. 0 = the plain unweighted loss.
      subject_loss_weight=0.0,
      # Probability that a clip is trained with all actions replaced by the NULL action (dit.null_action_id),
      # which enables classifier-free guidance on actions at sampling time. 0 = the paper's plain training.
      action_dropout=0.0,
      # Own-output context (ours, against rollout drift): clips of 2 steps (data.clip_steps = 2); for this fraction
      # of them the model first estimates frame 1 from frame 0 in one pass at a flow time ~ U[0,
      # own_context_max_time] (no gradient), then trains the step 1 -> 2 reading that estimate, latents and state,
      # as its previous frame, the way a sampler feeds back what it generated. The rest train 1 -> 2 from the
      # true frame 1. Needs dit.previous_frame_input, dit.context_tokens = False, coord_target = "displacement".
      own_context_prob=0.0,
      own_context_max_time=0.5,
  ))


def get_model_config(name: str = "tiny") -> ml_collections.ConfigDict:
  """The named model config: "tiny", "small" or "base"."""
  if name == "tiny":
    vae = _vae(channels=16, channel_mult=(1, 2, 4), latent_channels=8, num_res_blocks=1)
    dit = _dit(width=128, depth=4, heads=4, mlp=512, patch_size=2)
  elif name == "small":
    vae = _vae(channels=64, channel_mult=(1, 2, 2), latent_channels=8, num_res_blocks=2)
    dit = _dit(width=384, depth=8, heads=6, mlp=1536, patch_size=2)
  elif name == "base":
    vae = _vae(channels=96, channel_mult=(1, 2, 4, 4), latent_channels=16, num_res_blocks=2)
    dit = _dit(width=1536, depth=30, heads=12, mlp=8960, patch_size=2)
    dit.dtype = "bfloat16"
    dit.remat_policy = "dots_with_no_batch_dims_saveable"
  else:
    raise ValueError(f"unknown model config {name!r}, expected one of {MODEL_NAMES}")
  return ml_collections.ConfigDict(dict(
      name=name,
      max_players=actions_lib.MAX_PLAYERS,
      num_actions=actions_lib.NUM_ACTIONS,
      vae=vae,
      dit=dit,
      flow=_flow(),
  ))


def compression(config: ml_collections.ConfigDict) -> int:
  """Pixels per latent cell (the VAE's spatial stride)."""
  return 2 ** (len(config.vae.channel_mult) - 1)


def pixels_per_token(config: ml_collections.ConfigDict) -> int:
  """Pixels per video token side: VAE stride times DiT patch size."""
  return compression(config) * config.dit.patch_size
