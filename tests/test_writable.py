"""An output that cannot be written is one line before the work that produces it (facescale/writable.py),
and a write that fails on a full or read-only file system is one line naming the file (errors.py)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from facescale.errors import InputError, report_errors
from facescale.writable import require_writable


def _fill(mount: Path) -> None:
    with open(mount / "filler", "wb") as filler, pytest.raises(OSError):
        while True:
            filler.write(b"\0" * 65536)
            filler.flush()


def test_a_writable_place_is_left_as_it_was(tmp_path) -> None:
    """An input error later must leave no output behind: the check creates nothing and leaves no probe."""
    (tmp_path / "there").mkdir()
    require_writable(tmp_path / "there", "--out")
    require_writable(tmp_path / "a" / "b", "--out")
    require_writable(tmp_path / "c" / "file.pt", "--out", is_file=True)
    assert [p.name for p in tmp_path.rglob("*")] == ["there"]
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match=r"cannot create its folder \(Not a directory\)"):
        require_writable(tmp_path / "file" / "sub" / "x.pt", "--out", is_file=True)


def test_full_and_read_only_mounts_are_named_with_the_option(small_fs) -> None:
    _fill(small_fs)
    with pytest.raises(InputError) as full:
        require_writable(small_fs / "out", "--out")
    assert full.value.line() == (f"--out '{small_fs / 'out'}': cannot write files in it (No space left on "
                                 "device); give --out a folder this job can write")
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(InputError) as read_only:
        require_writable(small_fs / "new" / "model.onnx", "--out", is_file=True)
    assert read_only.value.line() == (
        f"--out '{small_fs / 'new' / 'model.onnx'}': cannot create its folder (Read-only file system); give "
        "--out a file in a folder this job can write")


def test_eval_ijb_checks_its_out_before_loading_anything(small_fs, tmp_path, capsys) -> None:
    """An IJB-C extraction takes hours and writes its result at the end: a read-only --out is refused first
    (the checkpoint named here does not even exist)."""
    from facescale.cli import main

    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    code = main(["eval", "ijb", "--checkpoint", str(tmp_path / "none"), "--root", str(tmp_path),
                 "--out", str(small_fs / "ijb")])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"facescale eval ijb: error: --out '{small_fs / 'ijb'}': cannot create the folder (Read-only file "
        "system); give --out a folder this job can write")


@pytest.mark.parametrize("code,fix", [
    (errno.ENOSPC, "free space there or write to another folder"),
    (errno.EROFS, "write to another folder (or remount that file system read-write)"),
])
def test_a_write_failing_on_full_or_read_only_storage_is_one_line(capsys, code, fix) -> None:
    def failing() -> int:
        raise OSError(code, os.strerror(code), "/data/out/shard-000001.tar")

    assert report_errors("facescale synth", failing) == 2
    assert capsys.readouterr().err.strip() == (
        f"facescale synth: error: /data/out/shard-000001.tar: {os.strerror(code).lower()}; {fix}")


def test_other_os_errors_keep_their_traceback() -> None:
    def failing() -> int:
        raise OSError(errno.ENOSPC, "no space")  # no file named: not something the user can point at

    with pytest.raises(OSError):
        report_errors("facescale synth", failing)
