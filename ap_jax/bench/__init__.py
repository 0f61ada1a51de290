"""`ap-jax bench`: what training and sampling cost, measured on this machine. Each benchmark prints a table and
returns (and with `--json`, writes) its rows; `BENCHMARKS.md` holds the latest tables and the commands.

  step      the denoiser's training step (forward, backward, AdamW, EMA) per config: median step time,
            examples/s, tokens/s, achieved FLOP/s (analytic FLOPs), MFU where the device's peak is known, compiled
            memory per device and, where the device reports it, its peak memory in use
  data      the input pipeline per source (stored episodes with frames; cached latents held in memory; live
            built-in episodes) and Grain worker count, in clips/s, beside what the step consumes (the
            headroom: pipeline clips/s over the step's; below 1 the step waits for data); built-in game steps/s
  peer      the same transformer shape in diffusers' WanTransformer3DModel (PyTorch), side by side: the ratio
            `speedup_vs_peer`; needs the `bench` extra (torch, diffusers)
  scaling   step time, memory and FLOPs against frames, resolution and players, with the fitted growth
  profile   where the training step's time goes: XLA op times from a JAX profiler trace, per op, per kind of op
            and per named scope of the model (not in `all`: it measures no speed of its own)
  sampling  autoregressive rollouts of a model with random weights (the cost does not depend on the weights):
            generated frames/s and latency per generated step against players, denoising steps, batch and the
            KV cache, with the compile time of the first rollout
  attention the model's masked attention, XLA against cuDNN's fused kernel (GPU only; not in `all`)

One module per benchmark (ap_jax/bench/<name>.py, each with its table); `common` holds the machine description,
the timing rule and the table number format; `step.training_step` builds the compiled step the step, profile,
peer and scaling benchmarks time.

Timings are medians over repeats after a warm-up that includes compilation; compare numbers from one run only.
"""

from ap_jax.bench.attention import attention_benchmark
from ap_jax.bench.common import machine, median_seconds
from ap_jax.bench.data import data_benchmark, data_table, game_steps_per_second, pipeline_clips_per_second
from ap_jax.bench.peer import peer_benchmark, peer_table
from ap_jax.bench.profile import PROFILE_SCOPES, profile_benchmark, profile_table
from ap_jax.bench.sampling import sampling_benchmark, sampling_table
from ap_jax.bench.scaling import SCALING, scaling_benchmark, scaling_table
from ap_jax.bench.step import TrainingStep, step_benchmark, step_table, training_step

__all__ = [
    "attention_benchmark", "data_benchmark", "data_table", "game_steps_per_second", "machine", "median_seconds",
    "peer_benchmark", "peer_table", "pipeline_clips_per_second", "PROFILE_SCOPES", "profile_benchmark",
    "profile_table", "sampling_benchmark", "sampling_table", "SCALING", "scaling_benchmark", "scaling_table",
    "step_benchmark", "step_table", "TrainingStep", "training_step",
]
