"""Atomic outputs, and the one rule for what nekotune may write over.

Writing: to a temporary name in the same directory, fsync, rename. A crash mid-write leaves the
previous good file or directory (or none), never a half one that loads as garbage.

Overwriting: a command that writes a directory claims it first (`claim_output_dir`): it must be
new, empty, or an earlier output of the same command (its marker file `.nekotune-output` says so),
and it must not be inside, equal to or above anything the command reads. A file output
(`check_output_file`) must be new or written by nekotune, and outside its sources. Everything
else is refused with a UserError: nekotune never deletes or overwrites what it did not write.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from nekotune.errors import UserError

MARKER = ".nekotune-output"  # in every directory nekotune writes as a whole: {"written_by": ..., ...}
LEGACY_MARKERS = {"nekotune_merge.json": "nekotune merge"}  # outputs of versions before the marker


def _read_umask() -> int:
    """The umask, read once at import. os.umask can only be read by setting it, which changes it
    for every thread of the process; Linux shows it in /proc without that."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)  # once, at import time (the main thread, before any worker starts)
    os.umask(current)
    return current


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK
DIR_MODE = 0o777 & ~UMASK


def readable_by_all(path: Path) -> None:
    """mkstemp/mkdtemp create private files; a finished output is an ordinary file or directory."""
    os.chmod(path, DIR_MODE if Path(path).is_dir() else FILE_MODE)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_full_error(path: Path | str) -> UserError:
    return UserError(f"disk full while writing {path}; free some space (nothing already saved was changed) "
                     f"and run the command again")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write_chunks(path, [data])


@contextmanager
def _beside(target: Path) -> Iterator[tuple[int, Path]]:
    """A new private file next to `target` (its descriptor and path), removed again if the block
    fails; a full disk becomes disk_full_error. The block renames it over `target` when done."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        yield fd, Path(tmp)
        _fsync_dir(target.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise disk_full_error(target) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_chunks(path: str | Path, chunks: Iterable[bytes]) -> None:
    """Write an iterable of byte chunks to `path` atomically (large files stream through)."""
    path = Path(path)
    with _beside(path) as (fd, tmp):
        os.chmod(tmp, FILE_MODE)  # mkstemp makes it private; the result is an ordinary file
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """A temporary path next to `target`, fsynced and renamed over it on success."""
    target = Path(target)
    with _beside(target) as (fd, tmp):
        os.close(fd)
        yield tmp
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)


def read_json(path: str | Path) -> Any:
    """A JSON file nekotune reads (configs, indexes, markers); a broken one is the user's to fix."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read ({exc}); the file is missing or damaged") from None


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(root))


# -- replacing a directory whole ----------------------------------------------------------------
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2: Any = None  # the C function, False where there is none, None before the first look


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux renameat2 RENAME_EXCHANGE), so no moment exists
    where `b` is missing. False where the OS, C library or filesystem cannot; then the caller
    falls back to two renames (what Windows and macOS get)."""
    global _renameat2
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if not _renameat2:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False  # an old kernel, or a filesystem without exchange (some network/FUSE ones)
    raise OSError(err, os.strerror(err), str(b))


def _old_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def recover_dir(target: str | Path) -> bool:
    """Undo a crash between the two renames of the fallback swap: `.<name>.old` without `<name>`
    is the previous good directory; put it back. True when it did."""
    target = Path(target)
    old = _old_name(target)
    if old.is_dir() and not old.is_symlink() and not _exists(target):
        os.replace(old, target)
        _fsync_dir(target.parent)
        return True
    return False


def _swap_in(tmp: Path, target: Path) -> None:
    if not _exists(target):
        os.replace(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous directory
    else:
        old = _old_name(target)
        shutil.rmtree(old, ignore_errors=True)  # a leftover of a finished swap (its target exists)
        os.replace(target, old)
        os.replace(tmp, target)  # a crash just before this line is undone by recover_dir
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(target.parent)


@contextmanager
def atomic_dir(target: str | Path, written_by: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it replaces `target` whole.

    With `written_by` (the command, e.g. "nekotune merge") the new directory gets the marker file,
    and an existing `target` is replaced only if `claim_output_dir` still allows it at that
    moment: a directory filled by someone else while the output was written is left alone."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, DIR_MODE)
        yield tmp
        if written_by:
            write_marker(tmp, written_by)
        fsync_tree(tmp)
        if written_by and _exists(target):
            claim_output_dir(target, written_by)
        _swap_in(tmp, target)
    except OSError as exc:
        _abandon(tmp, target)
        if exc.errno == errno.ENOSPC:
            raise disk_full_error(target) from None
        raise
    except BaseException:
        _abandon(tmp, target)
        raise


def _abandon(tmp: Path, target: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        recover_dir(target)  # interrupted between the two renames: the previous directory comes back now
    except OSError:
        pass


# -- what nekotune may write over -----------------------------------------------------------------
def write_marker(directory: Path, written_by: str) -> None:
    from nekotune import __version__

    atomic_write_json(Path(directory) / MARKER, {
        "written_by": written_by, "nekotune_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": "nekotune made this directory and may replace it whole; remove this file to protect it"})


def marker_of(directory: str | Path) -> str | None:
    """The command that wrote `directory`, from its marker file; None when nekotune did not."""
    directory = Path(directory)
    marker = directory / MARKER
    if marker.is_file() and not marker.is_symlink():
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        who = info.get("written_by") if isinstance(info, dict) else None
        return who if isinstance(who, str) and who.startswith("nekotune") else None
    return next((who for name, who in LEGACY_MARKERS.items() if (directory / name).is_file()), None)


def check_sources(out: Path, sources: Iterable, key: str = "--out") -> None:
    """Refuse an output equal to, inside or above anything the command reads."""
    resolved = out.expanduser().resolve()
    for source in sources:
        if not source:
            continue
        src = Path(source).expanduser().resolve()
        if resolved == src:
            raise UserError(f"{key} {out} is {src}, which this command reads; write the output somewhere else")
        if resolved.is_relative_to(src):
            raise UserError(f"{key} {out} is inside {src}, which this command reads; write the output "
                            f"somewhere outside it")
        if src.is_relative_to(resolved):
            raise UserError(f"{key} {out} contains {src}, which this command reads; write the output "
                            f"somewhere that does not hold it")


def claim_output_dir(path: str | Path, written_by: str, sources: Iterable = (), key: str = "--out") -> Path:
    """Check that `written_by` may (re)write the directory `path` whole; raise UserError otherwise."""
    path = Path(path).expanduser()
    recover_dir(path)
    if path.is_symlink():
        raise UserError(f"{key} {path} is a symbolic link; give a real directory (nekotune does not "
                        f"replace links)")
    if path.exists() and not path.is_dir():
        raise UserError(f"{key} {path} is a file; give a directory")
    check_sources(path, sources, key)
    if path.is_dir() and any(path.iterdir()) and marker_of(path) != written_by:
        raise UserError(f"{key} {path} is not empty and is not an earlier `{written_by}` output; choose a "
                        f"new or empty directory (nekotune never deletes what it did not write)")
    return path


def check_output_file(path: str | Path, sources: Iterable = (), key: str = "--out",
                      ours: Callable[[Path], bool] = lambda p: False) -> Path:
    """Check that a file output may be written: new, or one nekotune wrote (`ours`), and outside its sources."""
    path = Path(path).expanduser()
    if path.is_symlink():
        raise UserError(f"{key} {path} is a symbolic link; give a new file name (nekotune does not replace links)")
    if path.exists() and not path.is_file():
        raise UserError(f"{key} {path} exists and is not a file; give a new file name")
    check_sources(path, sources, key)
    if path.exists() and not ours(path):
        raise UserError(f"{key} {path} exists and was not written by nekotune; choose a new file name "
                        f"(nekotune never overwrites what it did not write)")
    return path


def inside_root(path: str | Path, root: str | Path, key: str) -> Path:
    """`path`, if it lies inside `root` (links followed); the UI writes nowhere else."""
    path = Path(path).expanduser()
    real, real_root = path.resolve(), Path(root).expanduser().resolve()
    if real == real_root or not real.is_relative_to(real_root):
        raise UserError(f"{key} {path} is outside output.root ({root}); give a path inside it")
    return path


RUN_MARKS = ("run.json", "adapter", "checkpoints")


def is_run_dir(path: str | Path) -> bool:
    """A training run directory: marked by `nekotune train`, or laid out as one (config.yaml plus
    run.json, adapter/ or checkpoints/), as runs from versions before the marker are."""
    path = Path(path)
    if marker_of(path) == "nekotune train":
        return True
    if path.is_dir() and {p.name for p in path.iterdir()} <= {".lock", MARKER}:
        return True  # a run killed before it wrote anything leaves only its lock file
    return (path / "config.yaml").is_file() and any(_exists(path / m) for m in RUN_MARKS)


def claim_run_dir(path: str | Path, key: str = "output.dir") -> Path:
    """A run directory to train in: new, empty, or a run (resumed or retrained); never a user's folder."""
    path = Path(path).expanduser()
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"{key} {path} is not a directory; give a new directory for the run")
    if path.is_dir() and any(path.iterdir()) and not is_run_dir(path):
        raise UserError(f"{key} {path} is not empty and is not a nekotune run; choose a new name "
                        f"(nekotune never writes into folders it did not create)")
    return path
