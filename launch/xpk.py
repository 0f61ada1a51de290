#!/usr/bin/env python3
"""TPU training on GKE: through XPK (Google's launcher for TPU workloads on GKE), or as a plain JobSet manifest
for `kubectl apply`.

  python launch/xpk.py cluster --cluster ap --tpu-type v5p-64 --num-slices 2 --zone us-east5-a --project P
  python launch/xpk.py train   --cluster ap --workload base-run1 --tpu-type v5p-64 --num-slices 2 \\
      --zone us-east5-a --project P --config base --workdir gs://BUCKET/runs/base [-- --config.KEY=VALUE ...]
  python launch/xpk.py delete  --cluster ap --workload base-run1 --zone us-east5-a --project P
  python launch/xpk.py jobset  --workload base-run1 --tpu-type v5p-64 --num-slices 2 --image IMAGE \\
      --config base --workdir gs://BUCKET/runs/base > jobset.yaml && kubectl apply -f jobset.yaml

`train` builds the workload's image from `--base-docker-image` (default python:3.12) with this checkout as the
script directory and installs ap_jax in it, unless `--docker-image` names a ready image. With `--num-slices N > 1`
the data-parallel mesh axis spans the slices over DCN (`--config.mesh.dcn_data=N`, unless the overrides set a
`dcn_*` axis themselves). JAX finds the hosts and slices from the environment GKE's TPU webhook sets, so no
coordinator flags are passed. `--workdir` (and `--data-dir`) must be paths every pod sees: `gs://` URLs, which
ap_jax reads and writes directly (the pods' Kubernetes service account needs the bucket through Workload Identity),
or a mounted bucket (the JobSet's `--bucket` mounts one at /mnt/gcs with GKE's Cloud Storage FUSE CSI driver;
with XPK, attach it as the cluster's storage).

Every subcommand takes `--dry-run` (print the commands or the manifest, run nothing).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# GKE node labels per TPU generation, and the name XPK takes for the slice type.
MOUNT = "/mnt/gcs"
GKE_ACCELERATOR = {"v5p": "tpu-v5p-slice", "v5e": "tpu-v5-lite-podslice", "v6e": "tpu-v6e-slice"}


def xpk_tpu_type(slice_name: str) -> str:
  generation, _, size = slice_name.partition("-")
  return f"v5litepod-{size}" if generation == "v5e" else slice_name


def slice_layout(slice_name: str) -> dict:
  """Topology, chips, hosts and chips per host of one slice (`v5p-64`, `v6e-64`, ...)."""
  sys.path.insert(0, str(ROOT))
  from ap_jax import aot  # the same slice names as `ap-jax aot`

  topology = aot.parse_topology(slice_name)
  chips = topology.chips_per_slice
  per_host = 8 if (topology.generation != "v5p" and chips == 8) else min(4, chips)
  return dict(generation=topology.generation, topology=topology.shape, chips=chips, chips_per_host=per_host,
              hosts=chips // per_host)


def with_slices(overrides: list[str], num_slices: int) -> list[str]:
  if num_slices > 1 and not any(o.startswith("--config.mesh.dcn_") for o in overrides):
    return [f"--config.mesh.dcn_data={num_slices}", *overrides]
  return list(overrides)


def train_command(args) -> list[str]:
  data = ["--config.data.source=dir", f"--config.data.dir={args.data_dir}"] if args.data_dir else []
  return ["ap-jax", "train", "--config", args.config, "--workdir", args.workdir, "--no-progress", *data,
          *with_slices(args.command, args.num_slices)]


def _common(args) -> list[str]:
  return ["--cluster", args.cluster, "--zone", args.zone] + (["--project", args.project] if args.project else [])


def _bucket_parts(bucket: str | None) -> tuple[str, str, str]:
  """(pod annotations, container volume mounts, pod volumes) for a bucket mounted by the GKE gcsfuse CSI driver."""
  if not bucket:
    return "", "", ""
  annotations = ("\n          metadata:\n            annotations:\n"
                 '              gke-gcsfuse/volumes: "true"')
  mounts = f"""
              volumeMounts:
              - name: gcs
                mountPath: {MOUNT}"""
  volumes = f"""
            volumes:
            - name: gcs
              csi:
                driver: gcsfuse.csi.storage.gke.io
                volumeAttributes:
                  bucketName: {bucket}
                  mountOptions: implicit-dirs"""
  return annotations, mounts, volumes


def jobset_manifest(args) -> str:
  layout = slice_layout(args.tpu_type)
  command = shlex.join(train_command(args))
  annotations, mounts, volumes = _bucket_parts(args.bucket)
  return f"""\
# ap_jax training: {args.num_slices} x {args.tpu_type} ({layout['topology']}, {layout['hosts']} hosts of \
{layout['chips_per_host']} chips per slice). kubectl apply -f THIS_FILE
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: {args.workload}
  annotations:
    alpha.jobset.sigs.k8s.io/exclusive-topology: cloud.google.com/gke-nodepool
spec:
  failurePolicy:
    maxRestarts: {args.max_restarts}
  replicatedJobs:
  - name: slice
    replicas: {args.num_slices}
    template:
      spec:
        parallelism: {layout['hosts']}
        completions: {layout['hosts']}
        backoffLimit: 0
        template:{annotations}
          spec:
            restartPolicy: Never
            hostNetwork: true
            dnsPolicy: ClusterFirstWithHostNet
            terminationGracePeriodSeconds: 300
            nodeSelector:
              cloud.google.com/gke-tpu-accelerator: {GKE_ACCELERATOR[layout['generation']]}
              cloud.google.com/gke-tpu-topology: {layout['topology']}
            containers:
            - name: ap-jax
              image: {args.image}
              command: ["bash", "-c", {json.dumps(command)}]
              resources:
                limits:
                  google.com/tpu: {layout['chips_per_host']}{mounts}{volumes}
"""


def plan(args) -> list[list[str]]:
  if args.what == "cluster":
    return [["xpk", "cluster", "create", *_common(args), "--tpu-type", xpk_tpu_type(args.tpu_type),
             "--num-slices", str(args.num_slices)] + (["--spot"] if args.spot else [])]
  if args.what == "train":
    image = (["--docker-image", args.docker_image] if args.docker_image else
             ["--base-docker-image", args.base_docker_image, "--script-dir", str(ROOT)])
    # Built from a base image, the script dir is the container's working directory: install it first.
    setup = "" if args.docker_image else "pip install -q -e '.[tpu,gcs]' && "
    return [["xpk", "workload", "create", *_common(args), "--workload", args.workload, "--tpu-type",
             xpk_tpu_type(args.tpu_type), "--num-slices", str(args.num_slices), *image,
             "--command", setup + shlex.join(train_command(args))]]
  if args.what == "delete":
    return [["xpk", "workload", "delete", *_common(args), "--workload", args.workload]]
  raise SystemExit(f"unknown subcommand {args.what!r}")


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("what", choices=("cluster", "train", "delete", "jobset"))
  parser.add_argument("--cluster", default=None)
  parser.add_argument("--workload", default=None, help="train/delete/jobset: the workload (JobSet) name")
  parser.add_argument("--zone", default=None)
  parser.add_argument("--project", default=None)
  parser.add_argument("--tpu-type", default="v5p-64", help="one slice: v5p-64, v6e-64, v5e-16, ...")
  parser.add_argument("--num-slices", type=int, default=1)
  parser.add_argument("--spot", action="store_true", help="cluster: spot node pools")
  parser.add_argument("--docker-image", default=None, help="train: a ready image with ap_jax installed")
  parser.add_argument("--base-docker-image", default="python:3.12", help="train: base to build the image from")
  parser.add_argument("--image", default=None, help="jobset: the container image (with ap_jax[tpu,gcs] installed)")
  parser.add_argument("--bucket", default=None,
                      help=f"jobset: a GCS bucket mounted at {MOUNT} in every pod (optional: gs:// paths work too)")
  parser.add_argument("--max-restarts", type=int, default=3, help="jobset: restarts after failure or preemption")
  parser.add_argument("--config", default="base")
  parser.add_argument("--workdir", default=None, help="gs://BUCKET/runs/NAME: a path every pod sees")
  parser.add_argument("--data-dir", default=None,
                      help="a stored dataset (gs://BUCKET/data/NAME); default: the config's")
  parser.add_argument("--dry-run", action="store_true")
  args = parser.parse_args(own)
  args.command = rest
  if args.num_slices < 1:
    parser.error(f"--num-slices {args.num_slices}: expected at least 1")
  bad = [o for o in rest if not o.startswith("--config.")]
  if bad:
    parser.error(f"after `--` only --config.KEY=VALUE overrides, got {bad}")
  need = dict(cluster=("cluster", "zone"), train=("cluster", "zone", "workload", "workdir"),
              delete=("cluster", "zone", "workload"), jobset=("workload", "workdir", "image"))[args.what]
  missing = [f"--{n.replace('_', '-')}" for n in need if not getattr(args, n)]
  if missing:
    parser.error(f"{args.what} needs {' '.join(missing)}")
  if args.what == "jobset":
    print(jobset_manifest(args), end="")
    return 0
  for cmd in plan(args):
    print(shlex.join(cmd), flush=True)
    if not args.dry_run:
      code = subprocess.call(cmd)
      if code:
        return code
  return 0


if __name__ == "__main__":
  sys.exit(main())
