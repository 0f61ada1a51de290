"""`ap-jax bench peer`: the same transformer shape in diffusers' WanTransformer3DModel (PyTorch), side by side with
ap_jax's denoiser step: the ratio `speedup_vs_peer`. Needs the `bench` extra (torch, diffusers)."""

from __future__ import annotations

import os
from typing import Sequence

from ap_jax.bench import common
from ap_jax.bench.step import step_benchmark
from ap_jax.data import locate


def peer_benchmark(config_name: str, overrides: Sequence[str] = (), *, repeats: int = 5, inner: int = 3,
                   subjects: Sequence[int] = (4, 8)) -> dict:
  """ap_jax's denoiser step against diffusers' `WanTransformer3DModel` (PyTorch; the family ActionParty's code
  builds on) at the same transformer shape (width, heads, MLP, depth, patch), video token count, batch and dtype
  (float32): forward, flow-matching loss, backward and AdamW, medians. ap_jax runs with subject tokens off (so the
  two sequences match), then with `subjects` subject slots on to show what they cost. Wan keeps its text
  cross-attention, fed one token per subject slot of the config. `speedup_vs_peer` = Wan's step time over ap_jax's."""
  import torch
  from diffusers import WanTransformer3DModel

  from ap_jax.model import config as model_config_lib

  config = common.load_config(config_name, overrides)
  dit = config.model.dit
  if str(dit.get("dtype", "float32")) != "float32":
    raise ValueError(f"model.dit.dtype = {dit.dtype}: the peer comparison runs float32 on both sides (pass "
                     "--config.model.dit.dtype=float32)")
  b, comp = int(config.data.global_batch_size), model_config_lib.compression(config.model)
  h, w = (v // comp for v in locate.frame_hw(config))
  patch, width, heads = int(dit.patch_size), int(dit.width), int(dit.heads)
  off = step_benchmark(config_name, list(overrides) + ["--config.model.dit.subject_tokens=false"], repeats=repeats,
                       inner=inner)
  video_tokens_per_frame = (h // patch) * (w // patch)
  frames = off["tokens_per_s"] / off["examples_per_s"] / video_tokens_per_frame
  if abs(frames - round(frames)) > 1e-6:
    raise ValueError(f"{config_name}: {frames} frames of video tokens per example; expected a whole number")
  frames = int(round(frames))
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  channels, slots = int(config.model.vae.latent_channels), int(config.model.max_players)
  model = WanTransformer3DModel(patch_size=(1, patch, patch), num_attention_heads=heads,
                                attention_head_dim=width // heads, in_channels=channels, out_channels=channels,
                                text_dim=width, freq_dim=int(dit.freq_dim), ffn_dim=int(dit.mlp),
                                num_layers=int(dit.depth), rope_max_seq_len=1024)
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
  x = torch.randn(b, channels, frames, h, w)
  target = torch.randn_like(x)
  t = torch.randint(0, 1000, (b,))
  text = torch.randn(b, slots, width)

  def peer_step():
    optimizer.zero_grad(set_to_none=True)
    out = model(x, t, text, return_dict=False)[0]
    loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    optimizer.step()

  peer_step()  # warm-up
  peer_s = common.median_seconds(peer_step, repeats=repeats, inner=inner)
  rows = [off] + [step_benchmark(config_name, list(overrides) + ["--config.model.dit.subject_tokens=true",
                                                                 f"--config.model.max_players={n}"],
                                 repeats=repeats, inner=inner) for n in subjects]
  return dict(config=config_name, overrides=list(overrides), batch=b, frames=frames,
              video_tokens=frames * video_tokens_per_frame, dtype="float32", torch=torch.__version__,
              torch_threads=torch.get_num_threads(),
              peer=dict(model="diffusers.WanTransformer3DModel", step_s=peer_s, examples_per_s=b / peer_s,
                        parameters=sum(p.numel() for p in model.parameters())),
              ap_jax=rows, speedup_vs_peer=peer_s / off["step_s"])


def peer_table(result: dict) -> str:
  lines = [f"{result['config']} shape, batch {result['batch']}, {result['video_tokens']} video tokens, "
           f"{result['dtype']}; torch {result['torch']} ({result['torch_threads']} threads)", "",
           "| model | subjects | params | step ms | examples/s | speed vs the peer |", "|---|---|---|---|---|---|"]
  peer = result["peer"]
  lines.append(f"| Wan (diffusers) | - | {peer['parameters']:,} | {1e3 * peer['step_s']:.1f} | "
               f"{peer['examples_per_s']:.1f} | 1.00x |")
  for r in result["ap_jax"]:
    subjects = next((o.split("=")[1] for o in r["overrides"] if o.startswith("--config.model.max_players=")), None)
    lines.append(f"| ap_jax | {subjects if r['subject_tokens'] else 'off'} | {r['parameters']:,} | "
                 f"{1e3 * r['step_s']:.1f} | {r['examples_per_s']:.1f} | {peer['step_s'] / r['step_s']:.2f}x |")
  return "\n".join(lines)
