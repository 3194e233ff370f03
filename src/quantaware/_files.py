"""Atomic file writes: a file appears under its final name complete, or not at all.

Every file quantaware writes goes through :func:`atomic_path`: the content is
written to a hidden temporary file in the target's folder (``.NAME.PID.XXXX.tmp``),
flushed to disk, given the permissions ``open`` would leave (an existing file's
own, else ``0666`` minus the umask) and renamed over the target (``os.replace`` is
atomic on POSIX); a target that is a symbolic link is written where it points,
as ``open`` would, not replaced by a plain file. A failure or interrupt removes
the temporary file and leaves any previous file at the target untouched; the
temporary file of a process killed outright (``kill -9``) is removed by the next
write of the same target.

Example:
    >>> import os, tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "out.txt"
    >>> _ = write_text(path, "hello\\n")
    >>> path.read_text()
    'hello\\n'
    >>> sorted(os.listdir(path.parent))
    ['out.txt']
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "check_writable_dir", "check_writable_file", "new_file_mode",
           "replace_file", "write_bytes", "write_json", "write_text"]


def new_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` that becomes ``path`` when the block succeeds.

    The caller writes the whole file to the yielded path (any library that takes a
    file name will do); on success it is synced and renamed over ``path``. Missing
    parent folders are created. ``suffix`` is appended to the temporary name for
    libraries that pick a format from the extension.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> target = Path(tempfile.mkdtemp()) / "a.bin"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_bytes(b"ok")
        >>> target.read_bytes()
        b'ok'
    """
    target = _resolved(Path(path))
    check_writable_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.",
                                    suffix=f"{suffix}.tmp", dir=target.parent)
    except PermissionError as exc:  # name the file asked for, not the temporary
        raise PermissionError(exc.errno, f"cannot write {str(target)!r}: "
                              f"{exc.strerror}") from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        replace_file(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _resolved(path: Path) -> Path:
    """Where writing ``path`` lands: the file a symbolic link points to."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def replace_file(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished file ``source`` over ``target`` (same file system) as
    writing ``target`` with ``open`` would end: an existing target keeps its
    permissions (a new one gets ``0666`` minus the umask), and a symbolic link
    keeps pointing where it did, its file replaced. Returns where the file went.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "new.txt").write_text("v2")
        >>> replace_file(folder / "new.txt", folder / "out.txt").read_text()
        'v2'
    """
    target = _resolved(Path(target))
    mode = target.stat().st_mode & 0o7777 if target.is_file() else new_file_mode()
    os.chmod(source, mode)
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        # a link to another file system: copy beside the target, then rename there
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        os.unlink(source)
    return target


def write_json(path: str | os.PathLike, payload: object) -> Path:
    """Write ``payload`` as indented JSON (with a final newline) atomically; return the path."""
    import json

    return write_text(path, json.dumps(payload, indent=2) + "\n")


def _remove_orphans(target: Path) -> None:
    """Delete temporary files of ``target`` left by processes that were killed while
    writing it (their PID is in the name and no longer runs)."""
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        pid = tmp.name[len(target.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except OSError:  # the process exists (owned by another user)
            continue


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def check_writable_file(path: str | os.PathLike, what: str = "") -> None:
    """Raise ``IsADirectoryError``/``NotADirectoryError``/``PermissionError`` now when
    ``path`` cannot be written as a file, naming ``what`` (e.g. ``"--json"``).

    Example:
        >>> import tempfile
        >>> check_writable_file(tempfile.mkdtemp(), "--json")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        IsADirectoryError: --json: '...' is a folder; give a file name
    """
    target = Path(path)
    label = f"{what}: " if what else ""
    if target.is_dir():
        raise IsADirectoryError(f"{label}{str(target)!r} is a folder; give a file name")
    _check_folder(target.parent, f"{label}cannot write {str(target)!r}")


def check_writable_dir(path: str | os.PathLike, what: str = "") -> None:
    """Raise ``NotADirectoryError``/``PermissionError`` now when files cannot be written
    into the folder ``path`` (created later if missing), naming ``what``.

    Example:
        >>> import tempfile
        >>> check_writable_dir(tempfile.mkdtemp(), "--out")  # an existing folder is fine
    """
    target = Path(path)
    label = f"{what}: " if what else ""
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{label}{str(target)!r} is a file; give a folder name")
    _check_folder(target, f"{label}cannot write into {str(target)!r}")


def _check_folder(folder: Path, failure: str) -> None:
    """Raise with ``failure`` as the message's start unless ``folder`` (created later
    if missing) can take new files."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise NotADirectoryError(f"{failure}: {str(existing)!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{failure}: the folder {str(existing)!r} is not writable")
