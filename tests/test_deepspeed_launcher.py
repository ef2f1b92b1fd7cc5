"""The `deepspeed` launcher with a hostfile runs `facescale train` on 2 ranks without ssh.

The hostfile comes from `launcher.hostfile` (two "nodes" of one slot each, as `deepspeed --hostfile` expects
on a cluster); each node is started with `--no_ssh --node_rank N`, which is how the launcher runs where
there is no passwordless ssh (and what a per-node srun would do). The launcher appends `--local_rank=N` to
the command (as the README's `deepspeed --num_gpus 8 --module facescale train ...` gets it): accepted, the
rank coming from LOCAL_RANK.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.hostfile import job_hostfile
from launcher.ports import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_deepspeed_launcher_two_nodes_from_hostfile(tmp_path):
    from facescale.data.synth import synthesize

    shards = tmp_path / "shards"
    synthesize(shards, identities=24, images_per_identity=4, holdout_identities=10, seed=3)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(job_hostfile(env={}, nodelist="node[1-2]", slots=1))
    run_dir, port = tmp_path / "run", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    sets = [
        f"data.shards={shards}",
        "eval.bins=[]",
        f"logging.run_dir={run_dir}",
        "schedule.steps=2",
        "schedule.warmup_steps=1",
        "schedule.global_batch_size=16",
        "logging.every_steps=1",
    ]
    nodes = []
    for node_rank in range(2):
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            f"--hostfile={hostfile}",
            "--no_ssh",
            f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "--module",
            "facescale",
            "train",
            "--config",
            "configs/synthetic.yaml",
            *[arg for s in sets for arg in ("--set", s)],
        ]
        log = (tmp_path / f"node{node_rank}.log").open("w")
        nodes.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=300) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    logs = "\n".join((tmp_path / f"node{r}.log").read_text()[-3000:] for r in range(2))
    assert codes == [0, 0], logs
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 2
    head = sorted(p.name for p in (run_dir / "checkpoints" / "step_00000002" / "head").iterdir())
    assert head == ["shard-00000-of-00002.pt", "shard-00001-of-00002.pt"]
