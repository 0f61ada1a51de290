"""The main job and the paper's comparison, on the built-in game.

`run_demo` (`ap-jax demo`, README's first command): generate data, train the tiny autoencoder and denoiser,
sample a 4-player rollout video, evaluate against the true game and print movement accuracy and subject
preservation. Everything lands in one output directory: `data/`, `ae/`, `dit_full/` (workdirs, resumable: running
the demo again continues where it stopped), `rollout_4p.mp4` (+ `.json`, and `.png`: the true game above the
generated frames), `results.json`.

`run_comparison` (`ap-jax compare`): the full model, the global-action baseline and the ablations, trained at
equal steps on the same data (2 to 7 players, the paper's protocol) with one shared autoencoder, each evaluated on
fresh built-in episodes with 1 to 8 players; writes `comparison.json` and `comparison.md` (the README table).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

from ap_jax import fs
from ap_jax import sample as sample_lib
from ap_jax import viz
from ap_jax.data import dataset as dataset_lib
from ap_jax.data import locate
from ap_jax.data import tfds_builder
from ap_jax.eval import cases as cases_lib
from ap_jax.eval import render as render_lib
from ap_jax.eval import report
from ap_jax.eval import run as run_lib
from ap_jax.train import config_utils
from ap_jax.train import restore as restore_lib
from ap_jax.train import trainer

log = logging.getLogger("ap_jax.demo")

TINY = "tiny"  # configs/tiny.py, by name: the config shipped with the package, found from any working directory

# The paper's comparison (PAPER.md "Baselines" and "Ablations"), as overrides of the tiny denoiser config.
VARIANTS: dict[str, list[str]] = {
    "full": [],
    # Without subject tokens there is no subject to rotate by its previous cell (meltingpot:tiny turns that on).
    "global_actions": ["--config.model.dit.subject_tokens=false", "--config.model.dit.subject_rope_previous=false"],
    "no_subject_isolation": ["--config.model.dit.subject_isolation=false"],
    "no_masked_cross_attention": ["--config.model.dit.masked_cross_attention=false"],
    "frame_wise_cross_attention": ["--config.model.dit.frame_wise=true"],
    "no_subject_rope": ["--config.model.dit.subject_rope=false"],
    # Ablations of our deviations from the paper (configs/tiny.py, docs/research_log.md).
    "no_facing_state": ["--config.model.dit.state_facing=false"],
    "velocity_coordinates": ["--config.model.flow.coord_target=velocity"],
}


def _config(arg: str, overrides: Sequence[str], base: str = TINY):
  """`base` (a config file or name, with its own arguments after a colon) with `arg` added to its arguments."""
  path, _, base_args = base.partition(":")
  args = ",".join(a for a in (base_args, arg) if a)
  return config_utils.apply_overrides(config_utils.load_config(f"{path}:{args}"), list(overrides))


DEMO_PLAYERS = (2, 4)  # the demo's training episodes
COMPARE_PLAYERS = (2, 7)  # the comparison's: the paper's protocol (trained on 2-7, evaluated on 1-8)


def build_data(out: str, episodes: int, players: tuple[int, int] = DEMO_PLAYERS) -> str:
  """The built-in dataset under `out/data/` (the demo's 2-4 players in `builtin`, other ranges in
  `builtin_MIN-MAX`), generated on first use."""
  name = "builtin" if tuple(players) == DEMO_PLAYERS else f"builtin_{players[0]}-{players[1]}"
  path = fs.join(out, "data", name)
  if not fs.exists(fs.join(path, dataset_lib.INFO_FILE)):
    spec = tfds_builder.GenerationSpec(episodes=episodes, steps=16, players=players)
    dataset_lib.build(spec, path)
  return path


def train_stages(out: str, data_dir: str | None, *, ae_steps: int, dit_steps: int, dit_overrides: Sequence[str] = (),
                 dit_name: str = "dit", progress: bool = True, base: str = TINY) -> tuple[str, str, dict]:
  """Trains (or resumes, or skips when finished) the autoencoder and one denoiser of config `base` on the dataset
  at `data_dir` (None: the dataset `base` names, generated on first use). Returns workdirs + seconds."""
  data = [] if data_dir is None else ["--config.data.source=dir", f"--config.data.dir={data_dir}"]
  ae_dir, dit_dir = fs.join(out, "ae"), fs.join(out, dit_name)
  seconds = {}
  start = time.time()
  trainer.train_stage(_config("autoencoder", data + [f"--config.total_steps={ae_steps}"], base), ae_dir,
                      what="the autoencoder", progress=progress)
  seconds["train_autoencoder"] = time.time() - start
  start = time.time()
  trainer.train_stage(_config("", data + [f"--config.total_steps={dit_steps}",
                                          f"--config.autoencoder_workdir={ae_dir}"] + list(dit_overrides), base),
                      dit_dir, what=f"the denoiser {dit_name}", progress=progress)
  seconds["train_denoiser"] = time.time() - start
  return ae_dir, dit_dir, seconds


def _sampler(trained, denoise_steps: int):
  return sample_lib.Sampler.from_trained(trained, denoise_steps=denoise_steps)


def run_demo(out: str, *, episodes: int = 2000, ae_steps: int = 1200, dit_steps: int = 2800,
             eval_episodes: int = 24, eval_steps: int = 16, denoise_steps: int = 10, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
  """The main job on the built-in game; returns (and writes) `results.json`'s contents."""
  fs.makedirs(out)
  seconds: dict[str, float] = {}
  start = time.time()
  data_dir = build_data(out, episodes)
  seconds["data"] = time.time() - start
  log.info("[demo 1/4] dataset ready at %s (%.0fs)", data_dir, seconds["data"])
  # The denoiser workdir is the comparison's "full" variant, so `ap-jax compare --out` the same directory reuses
  # the data, the autoencoder and this model.
  ae_dir, dit_dir, train_seconds = train_stages(out, data_dir, ae_steps=ae_steps, dit_steps=dit_steps,
                                                dit_name="dit_full", progress=progress)
  seconds.update(train_seconds)
  log.info("[demo 2/4] trained the autoencoder (%s) and the denoiser (%s)", ae_dir, dit_dir)

  trained = restore_lib.load_trained(dit_dir)
  sampler = _sampler(trained, denoise_steps)
  start = time.time()
  [case] = cases_lib.fresh_builtin_cases(trained.config, (4, 4), 1, eval_steps)
  frames, positions, _ = run_lib.run_cases(sampler, [case], seed=seed, batch_size=1)
  video, records = render_lib.render(case, frames[0], positions[0])
  video_path = viz.write_video(video, fs.join(out, "rollout_4p.mp4"))
  # The same rollout as a still: the true game (top) above the generated frames (bottom), first 9 frames.
  viz.write_strip([list(case.truth["frames"][:9]), list(frames[0][:9])], fs.join(out, "rollout_4p.png"))
  report.write_json(dict(case=case.name, players=case.num_players, steps=records),
                      fs.join(out, "rollout_4p.json"))
  seconds["sample_video"] = time.time() - start
  log.info("[demo 3/4] wrote %s", video_path)

  start = time.time()
  cases = cases_lib.dataset_cases(trained.config, "test", range(eval_episodes), eval_steps)
  results = run_lib.evaluate(trained, cases, seed=seed, batch_size=8, denoise_steps=denoise_steps)
  seconds["evaluate"] = time.time() - start
  results.update(video=fs.absolute(video_path), workdirs=dict(data=data_dir, autoencoder=ae_dir,
                                                                   denoiser=dit_dir),
                 demo_seconds=seconds, demo_settings=dict(episodes=episodes, ae_steps=ae_steps,
                                                          dit_steps=dit_steps, eval_episodes=eval_episodes,
                                                          eval_steps=eval_steps, denoise_steps=denoise_steps))
  report.write_json(results, fs.join(out, "results.json"))
  log.info("[demo 4/4] evaluated %d held-out episodes (%.0fs)", len(cases), seconds["evaluate"])
  print(report.markdown_table(results))
  hold = results["baselines"]["hold_initial_frame"]
  print(f"baseline, holding the initial frame: movement_accuracy {hold['movement_accuracy']:.3f}  "
        f"subject_preservation {hold['subject_preservation']:.3f}  psnr {hold['psnr']:.2f}")
  print(f"movement_accuracy {results['movement_accuracy']:.3f}  subject_preservation "
        f"{results['subject_preservation']:.3f}  ({sum(seconds.values()) / 60:.1f} min; {out}/results.json)")
  return results


def run_comparison(out: str, *, episodes: int = 2000, ae_steps: int = 800, dit_steps: int = 2800,
                   variants: Sequence[str] | None = None, eval_players: tuple[int, int] = (1, 8),
                   train_players: tuple[int, int] = COMPARE_PLAYERS, episodes_per_count: int = 6,
                   eval_steps: int = 8, denoise_steps: int = 10, seed: int = 0, config: str = "tiny",
                   eval_episodes: int = 24, progress: bool = True) -> dict[str, Any]:
  """Trains and evaluates each variant; writes comparison.json and comparison.md. Resumable per variant.

  `config` "tiny": the built-in game (`episodes` of `train_players` under `out/data/`). A Melting Pot config
  (`meltingpot:tiny`): its own substrates, players and dataset (generated into the cache). Each variant is scored on
  fresh episodes of each count in `eval_players` (Melting Pot: of the training substrates, counts they allow); a
  Melting Pot variant also on `eval_episodes` of the test split and of the held-out substrates
  (`data.heldout_substrates`), whole episodes."""
  names = list(variants or VARIANTS)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown variants {unknown}: expected names from {', '.join(VARIANTS)}")
  fs.makedirs(out)
  base_config = _config("", [], config)
  meltingpot = base_config.data.source == "meltingpot"
  if meltingpot:
    data_dir = None  # the config's own substrates
    train_players = tuple(base_config.data.players)
  elif base_config.data.source in ("builtin", "live"):
    data_dir = build_data(out, episodes, train_players)
  else:
    raise ValueError(f"--config {config}: data.source = {base_config.data.source!r}; the comparison generates its "
                     "data, so it takes the built-in game (tiny) or a Melting Pot config (meltingpot:tiny)")
  table: dict[str, Any] = {}
  for name in names:
    start = time.time()
    _, dit_dir, _ = train_stages(out, data_dir, ae_steps=ae_steps, dit_steps=dit_steps, base=config,
                                 dit_overrides=VARIANTS[name], dit_name=f"dit_{name}", progress=progress)
    train_s = time.time() - start
    trained = restore_lib.load_trained(dit_dir)
    start = time.time()
    cases = cases_lib.fresh_cases(trained.config, eval_players, episodes_per_count, eval_steps)
    results = run_lib.evaluate(trained, cases, seed=seed, batch_size=8, denoise_steps=denoise_steps)
    if meltingpot:  # also the dataset's own test split, and the substrates held out of training
      for key, path in (("test_split", locate.resolve_dataset(trained.config.data)),
                        ("heldout", locate.resolve_dataset(trained.config.data, heldout=True))):
        more = cases_lib.dataset_dir_cases(path, "test", range(eval_episodes), None)
        results[key] = run_lib.evaluate(trained, more, seed=seed, batch_size=8, denoise_steps=denoise_steps)
    results["seconds"] = dict(train=train_s, evaluate=time.time() - start)
    table[name] = results
    log.info("variant %s: movement %.3f, subjects %.3f", name, results["movement_accuracy"],
             results["subject_preservation"])
    report.write_json(table, fs.join(out, "comparison.json"))
  markdown = report.comparison_markdown(table, eval_players, train_players)
  fs.write_atomic(fs.join(out, "comparison.md"), markdown)
  print(markdown)
  return table
