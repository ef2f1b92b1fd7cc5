"""DeepSpeed hostfiles from Slurm nodelists: expansion, per-node slot counts, the CLI, and bad input."""

from __future__ import annotations

import pytest

from launcher.hostfile import HostfileError, expand_counts, hostfile_lines, job_hostfile, main


def test_expand_counts():
    assert expand_counts("8(x2),4") == [8, 8, 4]
    assert expand_counts("2") == [2]
    with pytest.raises(HostfileError, match="8x2"):
        expand_counts("8x2")


def test_hostfile_from_nodelist_with_fixed_slots():
    text = job_hostfile(env={}, nodelist="gpu[01-03],cpu7", slots=8)
    assert text == "gpu01 slots=8\ngpu02 slots=8\ngpu03 slots=8\ncpu7 slots=8\n"


def test_slots_from_the_job_environment():
    gpus = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_GPUS_ON_NODE": "4", "SLURM_TASKS_PER_NODE": "1(x2)"}
    assert job_hostfile(env=gpus) == "n1 slots=4\nn2 slots=4\n"
    cpus = {"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2),1"}
    assert job_hostfile(env=cpus) == "n1 slots=2\nn2 slots=2\nn3 slots=1\n"


def test_bad_input_is_named():
    with pytest.raises(HostfileError, match="no nodelist"):
        job_hostfile(env={})
    with pytest.raises(HostfileError, match="duplicate"):
        hostfile_lines(["a", "a"], 1)
    with pytest.raises(HostfileError, match="2 hosts but 1 slot counts"):
        hostfile_lines(["a", "b"], [1])


def test_cli_writes_the_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "hostfile"
    assert main(["--nodelist", "node[7-8]", "--slots", "2", "--out", str(out)]) == 0
    assert out.read_text() == "node7 slots=2\nnode8 slots=2\n"
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    assert main(["--slots", "2"]) == 2
    assert "no nodelist" in capsys.readouterr().err
