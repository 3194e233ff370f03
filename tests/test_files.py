"""Atomic writes and early output-path checks."""

from __future__ import annotations

import os
import stat

import pytest

from quantaware._files import (
    atomic_path,
    check_writable_dir,
    check_writable_file,
    write_bytes,
    write_text,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_files_get_the_permissions_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        write_bytes(tmp_path / "a.bin", b"x")
        with atomic_path(tmp_path / "b.onnx") as tmp:
            tmp.write_bytes(b"y")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.bin") == _mode(tmp_path / "b.onnx") == 0o666 & ~umask


def test_rewriting_a_file_keeps_its_permissions_and_its_symlink(tmp_path):
    """A private 0600 file came back 0644, and a symlinked output became a plain file
    beside the one it pointed to: ``open`` keeps both."""
    private = write_text(tmp_path / "key.json", "old")
    os.chmod(private, 0o600)
    write_text(private, "new")
    assert _mode(private) == 0o600 and private.read_text() == "new"
    real = write_text(tmp_path / "real" / "model.onnx", "v1")
    (tmp_path / "link.onnx").symlink_to(real)
    write_text(tmp_path / "link.onnx", "v2")
    assert (tmp_path / "link.onnx").is_symlink() and real.read_text() == "v2"


def test_a_link_to_another_file_system_is_written_through(tmp_path, monkeypatch):
    """os.replace cannot move a file across file systems (EXDEV): a symlinked output
    on another disk failed the whole run part way."""
    import errno

    from quantaware import _files

    target = write_text(tmp_path / "disk" / "model.pt", "v1")
    (tmp_path / "link.pt").symlink_to(target)
    (tmp_path / "new.pt").write_text("v2")
    real, calls = os.replace, []

    def across_disks(source, destination):
        calls.append(str(source))
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(source, destination)

    monkeypatch.setattr(_files.os, "replace", across_disks)
    _files.replace_file(tmp_path / "new.pt", tmp_path / "link.pt")
    assert (tmp_path / "link.pt").is_symlink() and target.read_text() == "v2"
    assert not (tmp_path / "new.pt").exists() and len(calls) == 2


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = write_text(tmp_path / "results.json", "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["results.json"]


def test_missing_folders_are_created(tmp_path):
    assert write_text(tmp_path / "a" / "b" / "c.txt", "ok").read_text() == "ok"


def test_a_folder_given_for_a_file_is_refused_before_writing(tmp_path):
    with pytest.raises(IsADirectoryError, match=r"--json: .* is a folder; give a file name"):
        check_writable_file(tmp_path, "--json")
    with pytest.raises(IsADirectoryError):
        write_text(tmp_path, "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"'.*file' is a file, not a folder"):
        check_writable_file(tmp_path / "file" / "out.json", "--out")
    check_writable_file(tmp_path / "new" / "out.json")  # a folder to be created is fine


def test_a_file_given_for_a_folder_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"--out: '.*file' is a file; give a folder"):
        check_writable_dir(tmp_path / "file", "--out")
    with pytest.raises(NotADirectoryError,
                       match=r"cannot write into '.*sub': '.*file' is a file, not a folder"):
        check_writable_dir(tmp_path / "file" / "sub", "--out")
    check_writable_dir(tmp_path)
    check_writable_dir(tmp_path / "to" / "be" / "made")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_a_read_only_folder_is_refused(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            check_writable_file(folder / "x.json", "--json")
        with pytest.raises(PermissionError, match="not writable"):
            check_writable_dir(folder / "out", "--out")
    finally:
        folder.chmod(0o700)


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        orphan = tmp_path / f".out.json.{dead.stdout.strip()}.abc123.tmp"
        running = tmp_path / f".out.json.{alive.pid}.def456.tmp"
        other = tmp_path / f".other.json.{dead.stdout.strip()}.abc123.tmp"
        for path in (orphan, running, other):
            path.write_text("half")
        write_text(tmp_path / "out.json", "{}")
        assert not orphan.exists()
        assert running.exists() and other.exists()  # a live writer's, another target's
    finally:
        alive.kill()
        alive.wait()
