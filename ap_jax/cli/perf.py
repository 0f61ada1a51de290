"""`ap-jax aot` (compile for a TPU slice on this host) and `ap-jax bench` (what a step, the input pipeline and
sampling cost here)."""

from __future__ import annotations

import json


# ------------------------------------------------------------------------------------------------ aot


def add_aot(sub):
  p = sub.add_parser("aot", help="compile a config's training and sampling steps for a TPU slice, on this machine",
                     description="Build the config's real training step (and, for a denoiser, one sampling "
                     "evaluation) with abstract inputs for a TPU pod slice described by libtpu, compile it with "
                     "XLA's TPU compiler on this host, and print per-device memory (arguments, outputs, "
                     "temporaries) against the chip's HBM, FLOPs per step and the roofline bound on step time and "
                     "MFU. Needs libtpu (the tpu extra). Exits 1 when the step does not fit. Extra "
                     "--config.KEY=VALUE arguments override config keys (the mesh: --config.mesh.fsdp=-1 ...).")
  p.add_argument("--config", required=True, help="config name or file, optionally with arguments: base[:ARGS]")
  p.add_argument("--topology", required=True,
                 help="Cloud TPU slice (v5p-8, v5p-64, v5e-16, v6e-256) or GENERATION:SHAPE (v5p:2x4x4)")
  p.add_argument("--num-slices", type=int, default=1,
                 help="slices over the data-center network; set the mesh's dcn_* sizes to match")
  p.add_argument("--sample-batch", type=int, default=None,
                 help="rollouts per sampling evaluation (default: one per batch shard)")
  p.add_argument("--denoise-steps", type=int, default=10, help="ODE steps per generated frame, for frames/s")
  p.add_argument("--no-sample", action="store_true", help="compile the training step only")
  p.add_argument("--no-train", action="store_true",
                 help="compile the sampling step only (an inference slice; with --sample-batch)")
  p.add_argument("--unroll-costs", action="store_true",
                 help="count a scanned block stack's FLOPs and bytes from the step unrolled at depths 1 and 2 (XLA "
                      "counts a loop body once; two more compiles)")
  p.add_argument("--json", default=None, help="write the report here")
  p.set_defaults(func=cmd_aot, accepts_config_overrides=True)


def cmd_aot(args) -> int:
  from ap_jax import aot
  from ap_jax.eval import report as report_lib
  from ap_jax.train import config_utils

  config = config_utils.apply_overrides(config_utils.load_config(args.config), args.overrides)
  topology = aot.parse_topology(args.topology, args.num_slices)
  report = aot.run_aot(config, topology, sample=not args.no_sample, train=not args.no_train,
                       sample_batch=args.sample_batch,
                       denoise_steps=args.denoise_steps, unroll_costs=args.unroll_costs)
  report["config"] = args.config
  report["overrides"] = list(args.overrides)
  print(aot.format_report(report))
  if args.json:
    report_lib.write_json(report, args.json)
    print(f"wrote {args.json}")
  fits = [report[k]["fits"] for k in ("train", "sample") if k in report]
  return 0 if all(f is not False for f in fits) else 1


# ------------------------------------------------------------------------------------------------ bench


def add_bench(sub):
  p = sub.add_parser("bench", help="benchmarks: training step, input pipeline, sampling (tables + JSON)",
                     description="Measure on this machine what a training step, the input pipeline and sampling "
                     "cost (ap_jax/bench/ says what each reports). Prints tables; --json writes every row.")
  p.add_argument("what", choices=("step", "data", "sampling", "peer", "attention", "scaling", "profile", "all"))
  p.add_argument("--config", default="tiny", help="peer, profile, scaling: the config measured (peer: the shape "
                 "both models take)")
  p.add_argument("--configs", default="tiny,small", help="step: comma-separated config names or files")
  p.add_argument("--sampling-config", default="tiny", help="sampling: the config whose model is timed")
  p.add_argument("--meshes", default=None,
                 help="sampling: semicolon-separated meshes to run each setting on, e.g. 'data=8;data=4,tensor=2' "
                      "(an empty item: one device); with --batches, the sharded inference sweep")
  p.add_argument("--batches", default=None, help="sampling: comma-separated rollout batches (with --players, "
                 "--denoise-steps) instead of the default one-at-a-time sweep")
  p.add_argument("--players", type=int, default=7, help="sampling with --batches: players per rollout")
  p.add_argument("--denoise-steps", type=int, default=10, help="sampling with --batches: ODE steps per frame")
  p.add_argument("--batch", type=int, default=16, help="data: batch size (the step is timed at this batch too)")
  p.add_argument("--workers", default="0,1,2,4", help="data: Grain worker process counts")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--quick", action="store_true", help="fewer repeats and batches (a smoke run)")
  p.add_argument("--trace-dir", default=None,
                 help="profile: keep the JAX profiler trace here (open it in TensorBoard or Perfetto)")
  p.add_argument("--top", type=int, default=20, help="profile: rows of the kinds-of-op table")
  p.add_argument("--json", default=None, help="write the results here")
  p.set_defaults(func=cmd_bench, accepts_config_overrides=True)


def cmd_bench(args) -> int:
  from ap_jax import bench
  from ap_jax.eval import report as report_lib

  repeats = 2 if args.quick else args.repeats
  result: dict = dict(machine=bench.machine())
  print(f"machine: {json.dumps(result['machine'])}")
  step_rows = []
  if args.what in ("step", "all", "data"):
    configs = [c for c in args.configs.split(",") if c] if args.what != "data" else ["tiny"]
    for name in configs:
      overrides = list(args.overrides) + ([f"--config.data.global_batch_size={args.batch}"]
                                          if args.what == "data" else [])
      step_rows.append(bench.step_benchmark(name, overrides, repeats=repeats, inner=2 if args.quick else 5))
    result["step"] = step_rows
    print("\ntraining step (denoiser)\n" + bench.step_table(step_rows))
  if args.what in ("data", "all"):
    tiny = next((r for r in step_rows if r["config"] == "tiny" and r["batch"] == args.batch), None)
    result["data"] = bench.data_benchmark(batch=args.batch, workers=[int(w) for w in args.workers.split(",")],
                                          batches=10 if args.quick else 40, episodes=60 if args.quick else 300,
                                          game_episodes=16 if args.quick else 256,
                                          step_s=tiny["step_s"] if tiny else None)
    print("\ninput pipeline (clips/s; headroom: pipeline rate over the tiny step's consumption at this batch)\n"
          + bench.data_table(result["data"]))
  if args.what in ("sampling", "all"):
    meshes = args.meshes.split(";") if args.meshes is not None else [None]
    grid = None
    if args.batches:
      grid = [dict(players=args.players, denoise_steps=args.denoise_steps, batch=int(b), use_cache=True)
              for b in args.batches.split(",")]
    result["sampling"] = bench.sampling_benchmark(args.sampling_config, args.overrides, grid=grid,
                                                  steps=4 if args.quick else 8, repeats=1 if args.quick else 3,
                                                  meshes=meshes)
    print("\nsampling (random weights)\n" + bench.sampling_table(result["sampling"]))
  if args.what in ("scaling", "all"):
    result["scaling"] = bench.scaling_benchmark(args.config, repeats=2 if args.quick else 3,
                                                inner=1 if args.quick else 2)
    print("\nscaling (training step)\n" + bench.scaling_table(result["scaling"]))
  if args.what == "profile":  # not in "all": it attributes time, it measures no speed of its own
    result["profile"] = bench.profile_benchmark(args.config, args.overrides, steps=2 if args.quick else 5,
                                                trace_dir=args.trace_dir, top=args.top)
    print("\nwhere the training step's time goes (XLA op times from the profiler trace)\n"
          + bench.profile_table(result["profile"]))
  if args.what == "attention":  # not in "all": it says something only on a GPU
    result["attention"] = bench.attention_benchmark()
    print("\nattention, XLA against cuDNN\n" + json.dumps(result["attention"], indent=1))
  if args.what in ("peer", "all"):
    result["peer"] = bench.peer_benchmark(args.config, args.overrides, repeats=repeats,
                                          inner=1 if args.quick else 3)
    result["speedup_vs_peer"] = result["peer"]["speedup_vs_peer"]
    print("\nagainst the peer (forward, loss, backward, AdamW)\n" + bench.peer_table(result["peer"]))
  if args.json:
    report_lib.write_json(result, args.json)
    print(f"\nwrote {args.json}")
  return 0
