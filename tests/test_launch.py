"""launch/: the pod and multi-process launchers. Their dry-runs print the exact commands; these tests read them back
and check that the config, workdir, overrides and process settings arrive where they must."""

import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, *args, check=True):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], capture_output=True,
                        text=True, timeout=300, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  if check:
    assert proc.returncode == 0, proc.stderr[-2000:]
  return proc


def lines(proc):
  return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def option(argv, name):
  return argv[argv.index(name) + 1]


# ------------------------------------------------------------------------------------------ multiprocess.py


def test_multiprocess_dry_run_gives_each_process_its_id_and_one_coordinator():
  cmd = ["ap-jax", "train", "--config", "tiny:runlocal", "--workdir", "runs/mp", "--config.total_steps=3"]
  out = launch("multiprocess.py", "--processes", "3", "--devices-per-process", "2", "--port", "4321", "--dry-run",
               "--", *cmd)
  rows = out.stdout.splitlines()
  assert len(rows) == 3
  for i, row in enumerate(rows):
    prefix, rest = row.split(" ", 1)
    assert prefix == f"[p{i}]"
    words = shlex.split(rest)
    env = dict(w.split("=", 1) for w in words[:5])
    assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                   "AP_JAX_COORDINATOR": "127.0.0.1:4321", "AP_JAX_NUM_PROCESSES": "3",
                   "AP_JAX_PROCESS_ID": str(i)}
    assert words[5:] == cmd


def test_multiprocess_runs_every_process_with_its_settings_and_passes_on_a_failure():
  probe = ("import os, sys; print(os.environ['AP_JAX_PROCESS_ID'], os.environ['AP_JAX_NUM_PROCESSES'], "
           "os.environ['XLA_FLAGS']); sys.exit(3 if os.environ['AP_JAX_PROCESS_ID'] == '1' else 0)")
  out = launch("multiprocess.py", "--processes", "2", "--devices-per-process", "4", "--", sys.executable, "-c", probe,
               check=False)
  assert out.returncode == 3  # process 1's exit code
  assert "[p0] 0 2 --xla_force_host_platform_device_count=4" in out.stdout
  assert "[p1] 1 2 --xla_force_host_platform_device_count=4" in out.stdout
  assert "process 1 exited with 3" in out.stderr


def test_multiprocess_refuses_a_missing_command():
  out = launch("multiprocess.py", "--processes", "2", check=False)
  assert out.returncode == 2 and "no command" in out.stderr


# ------------------------------------------------------------------------------------------------ tpu_vm.py

TPU = ["--name", "ap-run", "--zone", "us-east5-a", "--project", "proj"]


def test_tpu_vm_create_directly_or_through_a_queued_resource():
  (direct,) = lines(launch("tpu_vm.py", "create", *TPU, "--accelerator", "v6e-64", "--dry-run"))
  assert direct[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ap-run"]
  assert option(direct, "--accelerator-type") == "v6e-64" and option(direct, "--version") == "v2-alpha-tpuv6e"
  assert option(direct, "--zone") == "us-east5-a" and option(direct, "--project") == "proj"
  assert "--spot" not in direct
  (queued,) = lines(launch("tpu_vm.py", "create", *TPU, "--accelerator", "v5p-64", "--queued", "--spot",
                           "--dry-run"))
  assert queued[3:6] == ["queued-resources", "create", "ap-run"] and option(queued, "--node-id") == "ap-run"
  assert option(queued, "--runtime-version") == "v2-alpha-tpuv5" and "--spot" in queued
  (gone,) = lines(launch("tpu_vm.py", "delete", *TPU, "--queued", "--dry-run"))
  assert gone[3:6] == ["queued-resources", "delete", "ap-run"] and "--force" in gone
  bad = launch("tpu_vm.py", "create", *TPU, "--accelerator", "a100-8", "--dry-run", check=False)
  assert bad.returncode != 0 and "a100-8" in bad.stderr


def test_tpu_vm_install_copies_the_checkout_to_every_worker():
  tar, scp, ssh = lines(launch("tpu_vm.py", "install", *TPU, "--dry-run"))
  assert tar[0] == "tar" and option(tar, "-C") == ROOT and "--exclude=.venv" in tar
  assert scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp and scp[5] == option(tar, "-czf")
  assert ssh[3:6] == ["tpu-vm", "ssh", "ap-run"] and "--worker=all" in ssh
  assert "pip install -q -e '.[tpu,gcs]'" in option(ssh, "--command")


def test_tpu_vm_train_runs_the_same_command_on_all_hosts():
  (ssh,) = lines(launch("tpu_vm.py", "train", *TPU, "--config", "base", "--workdir", "/mnt/gcs/runs/base",
                        "--data-dir", "/mnt/gcs/data/builtin", "--dry-run", "--", "--config.total_steps=500",
                        "--config.mesh.fsdp=-1"))
  assert "--worker=all" in ssh and option(ssh, "--zone") == "us-east5-a"
  remote = option(ssh, "--command")
  started = re.search(r"nohup (.*) > (\S+) 2>&1", remote)
  assert started and started.group(2) == "~/ap_jax_logs/train.log"
  train = shlex.split(started.group(1))
  assert train[:2] == ["ap-jax", "train"] and option(train, "--config") == "base"
  assert option(train, "--workdir") == "/mnt/gcs/runs/base"
  assert train[-4:] == ["--config.data.source=dir", "--config.data.dir=/mnt/gcs/data/builtin",
                        "--config.total_steps=500", "--config.mesh.fsdp=-1"]
  assert "--coordinator" not in train  # TPU VMs: JAX finds the hosts itself
  (logs,) = lines(launch("tpu_vm.py", "logs", *TPU, "--dry-run"))
  assert "--worker=0" in logs and "train.log" in option(logs, "--command")
  (stop,) = lines(launch("tpu_vm.py", "stop", *TPU, "--dry-run"))
  assert "--worker=all" in stop and "pkill -TERM" in option(stop, "--command")


def test_tpu_vm_mount_puts_the_bucket_at_the_same_path_on_every_host():
  (ssh,) = lines(launch("tpu_vm.py", "mount", *TPU, "--bucket", "my-bkt", "--dry-run"))
  assert "--worker=all" in ssh
  remote = option(ssh, "--command")
  assert remote.endswith("(mountpoint -q /mnt/gcs || gcsfuse --implicit-dirs my-bkt /mnt/gcs)")
  assert "apt-get install -y -q gcsfuse" in remote
  missing = launch("tpu_vm.py", "mount", *TPU, "--dry-run", check=False)
  assert missing.returncode == 2 and "--bucket" in missing.stderr


def test_tpu_vm_train_carries_bucket_urls_and_refuses_what_would_not_reach_every_host():
  (ssh,) = lines(launch("tpu_vm.py", "train", *TPU, "--workdir", "gs://bkt/runs/dit", "--data-dir", "gs://bkt/data/b",
                        "--dry-run", "--", "--config.autoencoder_workdir=gs://bkt/runs/ae"))
  train = shlex.split(re.search(r"nohup (.*) > ", option(ssh, "--command")).group(1))
  assert option(train, "--workdir") == "gs://bkt/runs/dit"
  assert train[-3:] == ["--config.data.source=dir", "--config.data.dir=gs://bkt/data/b",
                        "--config.autoencoder_workdir=gs://bkt/runs/ae"]
  no_workdir = launch("tpu_vm.py", "train", *TPU, "--dry-run", check=False)
  assert no_workdir.returncode == 2 and "--workdir" in no_workdir.stderr
  stray = launch("tpu_vm.py", "train", *TPU, "--workdir", "/mnt/gcs/r", "--dry-run", "--", "--steps=5", check=False)
  assert stray.returncode == 2 and "--steps=5" in stray.stderr


# --------------------------------------------------------------------------------------------------- xpk.py

GKE = ["--cluster", "ap", "--zone", "us-east5-a", "--project", "proj"]


def test_xpk_train_spans_slices_over_dcn_and_carries_the_run():
  (create,) = lines(launch("xpk.py", "cluster", *GKE, "--tpu-type", "v5e-16", "--num-slices", "2", "--dry-run"))
  assert create[:3] == ["xpk", "cluster", "create"] and option(create, "--tpu-type") == "v5litepod-16"
  assert option(create, "--num-slices") == "2" and option(create, "--cluster") == "ap"
  (work,) = lines(launch("xpk.py", "train", *GKE, "--workload", "run1", "--tpu-type", "v5p-64", "--num-slices", "2",
                         "--config", "base", "--workdir", "/mnt/gcs/runs/base", "--dry-run", "--",
                         "--config.total_steps=9"))
  assert work[:3] == ["xpk", "workload", "create"] and option(work, "--workload") == "run1"
  assert option(work, "--num-slices") == "2" and option(work, "--script-dir") == ROOT
  setup, train = option(work, "--command").split(" && ")
  assert setup == "pip install -q -e '.[tpu,gcs]'"
  train = shlex.split(train)
  assert option(train, "--config") == "base" and option(train, "--workdir") == "/mnt/gcs/runs/base"
  assert train[-2:] == ["--config.mesh.dcn_data=2", "--config.total_steps=9"]
  # A dcn axis the user chose is kept as given; a ready image needs no install.
  (own,) = lines(launch("xpk.py", "train", *GKE, "--workload", "run1", "--num-slices", "2", "--docker-image",
                        "gcr.io/p/ap:1", "--workdir", "/mnt/gcs/r", "--dry-run", "--", "--config.mesh.dcn_fsdp=2"))
  assert option(own, "--docker-image") == "gcr.io/p/ap:1" and "--script-dir" not in own
  assert shlex.split(option(own, "--command"))[-1] == "--config.mesh.dcn_fsdp=2"
  assert "dcn_data" not in option(own, "--command")
  (gone,) = lines(launch("xpk.py", "delete", *GKE, "--workload", "run1", "--dry-run"))
  assert gone[:3] == ["xpk", "workload", "delete"] and option(gone, "--workload") == "run1"


@pytest.mark.parametrize("tpu_type,accelerator,topology,hosts,per_host", [
    ("v5p-64", "tpu-v5p-slice", "2x4x4", 8, 4), ("v6e-64", "tpu-v6e-slice", "8x8", 16, 4),
    ("v5e-8", "tpu-v5-lite-podslice", "2x4", 1, 8)])
def test_jobset_manifest_asks_for_the_slice_and_runs_the_training(tpu_type, accelerator, topology, hosts, per_host):
  out = launch("xpk.py", "jobset", "--workload", "run1", "--tpu-type", tpu_type, "--num-slices", "2", "--image",
               "gcr.io/p/ap:1", "--config", "base", "--workdir", "/mnt/gcs/runs/base", "--", "--config.seed=3")
  doc = yaml.safe_load(out.stdout)
  assert doc["kind"] == "JobSet" and doc["metadata"]["name"] == "run1"
  (job,) = doc["spec"]["replicatedJobs"]
  assert job["replicas"] == 2
  spec = job["template"]["spec"]
  assert spec["parallelism"] == spec["completions"] == hosts
  pod = spec["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                 "cloud.google.com/gke-tpu-topology": topology}
  (container,) = pod["containers"]
  assert container["image"] == "gcr.io/p/ap:1" and container["resources"]["limits"]["google.com/tpu"] == per_host
  assert container["command"][:2] == ["bash", "-c"]
  train = shlex.split(container["command"][2])
  assert train[:2] == ["ap-jax", "train"] and option(train, "--workdir") == "/mnt/gcs/runs/base"
  assert train[-2:] == ["--config.mesh.dcn_data=2", "--config.seed=3"]
  assert "volumes" not in pod  # no bucket asked for


def test_jobset_mounts_the_bucket_where_the_workdir_is():
  out = launch("xpk.py", "jobset", "--workload", "run1", "--image", "img", "--bucket", "my-bkt", "--workdir",
               "/mnt/gcs/runs/base")
  template = yaml.safe_load(out.stdout)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
  assert template["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true"}
  (volume,) = template["spec"]["volumes"]
  assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
  assert volume["csi"]["volumeAttributes"]["bucketName"] == "my-bkt"
  (container,) = template["spec"]["containers"]
  assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": "/mnt/gcs"}]


def test_xpk_carries_bucket_urls_and_names_what_is_missing():
  out = launch("xpk.py", "jobset", "--workload", "run1", "--image", "img", "--workdir", "gs://b/r", "--data-dir",
               "gs://b/data")
  pod = yaml.safe_load(out.stdout)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  train = shlex.split(pod["containers"][0]["command"][2])
  assert option(train, "--workdir") == "gs://b/r" and "--config.data.dir=gs://b/data" in train
  assert "volumes" not in pod  # a URL needs no mount
  out = launch("xpk.py", "jobset", "--workload", "run1", "--workdir", "/mnt/gcs/r", check=False)
  assert out.returncode == 2 and "--image" in out.stderr
  out = launch("xpk.py", "train", *GKE, "--workdir", "/mnt/gcs/r", "--dry-run", check=False)
  assert out.returncode == 2 and "--workload" in out.stderr


def test_gpu_arms_take_an_optional_training_seed():
  """launch/gpu_curve.parse_arms: VARIANT:BATCHxSTEPS[:sSEED]; a seed becomes --config.seed and part of the arm's
  name, a repeated arm without seeds and a malformed seed are refused, naming the item."""
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  try:
    import gpu_curve
  finally:
    sys.path.pop(0)
  arms = gpu_curve.parse_arms("full:16x2800,full:16x2800:s1,global_actions:48x8400:s12")
  assert [(a["name"], a["seed"]) for a in arms] == [("full_b16_s2800", None), ("full_b16_s2800_seed1", 1),
                                                    ("global_actions_b48_s8400_seed12", 12)]
  assert not any(o.startswith("--config.seed") for o in gpu_curve.arm_overrides(arms[0], "/ae"))
  assert "--config.seed=1" in gpu_curve.arm_overrides(arms[1], "/ae")
  assert "--config.data.global_batch_size=48" in gpu_curve.arm_overrides(arms[2], "/ae")
  assert [gpu_curve.arm_label(a) for a in arms] == ["full", "full (seed 1)", "global_actions (seed 12)"]
  with pytest.raises(SystemExit, match="an arm is named twice"):
    gpu_curve.parse_arms("full:16x2800,full:16x2800")
  for bad in ("full:16x2800:seed1", "full:16x2800:s1:s2", "full:16x2800:s"):
    with pytest.raises(SystemExit, match=re.escape(f"--arms item {bad!r}: expected VARIANT:BATCHxSTEPS")):
      gpu_curve.parse_arms(bad)


def test_gpu_arms_run_side_by_side_and_the_deadline_cuts_the_slow_one(tmp_path):
  """launch/gpu_curve.train_arms (shared by gpu_meltingpot.py): an arm still running at the deadline gets SIGTERM
  and is marked cut; an arm that finished keeps its exit status; each arm's output goes to its own log."""
  sys.path.insert(0, os.path.join(ROOT, "launch"))
  try:
    import gpu_curve
  finally:
    sys.path.pop(0)
  import time

  slow = ("import signal, sys, time\n"
          "signal.signal(signal.SIGTERM, lambda *_: (print('saved at the signal', flush=True), sys.exit(0)))\n"
          "time.sleep(60)\n")
  arms = [dict(name="fast", cmd=[sys.executable, "-c", "print('done')"]),
          dict(name="slow", cmd=[sys.executable, "-c", slow])]
  start = time.time()
  cut = gpu_curve.train_arms(arms, str(tmp_path), time.time() + 3.0, dict(os.environ))
  assert time.time() - start < 30
  assert cut == ["slow"]
  assert [(a["cut"], a["train_rc"]) for a in arms] == [(False, 0), (True, 0)]
  assert (tmp_path / "train_fast.log").read_text().strip() == "done"
  assert "saved at the signal" in (tmp_path / "train_slow.log").read_text()
