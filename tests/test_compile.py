"""`model.compile: true`: the backbone is compiled once per process, never recompiled, also after a resume.

Runs `facescale train` on one CPU rank with the `aot_eager` backend (dynamo's tracing, guards and AOT
autograd, without inductor's code generation, so the test stays quick); recompiles come from dynamo's guards,
which are the same for every backend. The trainer logs the number of graphs handed to the backend after the
first and the last step of each process (facescale/models/compile.py).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from launcher.local import local_train_command

GRAPHS = re.compile(r"torch\.compile: (\d+) graph\(s\) compiled in this process, [\d.]+ s in the backend; "
                    r"step (\d+) took")


def _train(shards: Path, run_dir: Path, steps: int) -> dict[int, int]:
    """{step: graphs compiled so far} from the console of one `facescale train` process."""
    settings = [f"data.shards={shards}", "eval.bins=[]", f"logging.run_dir={run_dir}",
                f"schedule.steps={steps}", "schedule.warmup_steps=1", "schedule.global_batch_size=16",
                "checkpoint.every_steps=2", "logging.tensorboard=false", "model.compile=true",
                "model.compile_backend=aot_eager"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(local_train_command(1, "configs/synthetic.yaml", settings), capture_output=True,
                          text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {int(step): int(graphs) for graphs, step in GRAPHS.findall(done.stdout + done.stderr)}


@pytest.mark.slow
def test_compiled_run_compiles_once_and_a_resumed_run_does_not_recompile(tmp_path):
    from facescale.data.synth import synthesize

    shards = tmp_path / "shards"
    synthesize(shards, identities=12, images_per_identity=4, holdout_identities=0, seed=3)
    run_dir = tmp_path / "run"
    fresh = _train(shards, run_dir, steps=4)
    assert sorted(fresh) == [1, 4] and fresh[1] >= 1, fresh
    assert fresh[4] == fresh[1], f"recompiled after the first step: {fresh}"
    resumed = _train(shards, run_dir, steps=7)  # resumes from the step-4 checkpoint
    assert sorted(resumed) == [5, 7], resumed  # its first step is 5: it did resume
    assert resumed[5] == fresh[1] and resumed[7] == resumed[5], f"fresh {fresh}, resumed {resumed}"
