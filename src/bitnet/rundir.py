"""A run folder (OUT_DIR): its file names, atomic writes, the one-writer lock, and the twin layout.

    OUT_DIR/ckpt.pt  ckpt.prev.pt  metrics.jsonl  summary.json  run.lock    one run
    OUT_DIR/ternary/  OUT_DIR/fp/  (+ the pair's summary.json, verdict.json)  a --twin run
"""
import contextlib
import fcntl
import json
import os
import shutil
import sys

from .errors import AFTER_DISK_FULL, DiskFull, TrainingError, disk_trouble

CKPT_NAME = "ckpt.pt"
PREV_CKPT_NAME = "ckpt.prev.pt"  # the good checkpoint before the latest one
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = "run.lock"


def previous_checkpoint(path: str) -> str:
    """OUT_DIR/ckpt.prev.pt beside OUT_DIR/ckpt.pt."""
    return os.path.join(os.path.dirname(path), PREV_CKPT_NAME)


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str, what: str = "", needs: int = 0, then: str = AFTER_DISK_FULL):
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure remove it.
    A crash or a full disk never leaves half a file where a good one was. A full or failing disk
    becomes DiskFull naming `what` (e.g. "the checkpoint"), `path`, and the `needs` bytes."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        _remove(tmp)  # first, so the free space reported is what the user really has
        raise_if_disk_full(e, what, path, needs or written, then, at_least=not needs)
        raise
    finally:
        _remove(tmp)


def _remove(path: str):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def raise_if_disk_full(e: BaseException, what: str, path: str, needs: int = 0, then: str = AFTER_DISK_FULL,
                       at_least: bool = False, whole: bool = False):
    """Raise DiskFull (one line: what, where, the space it needs and what there is) when `e` is a
    write that failed on a full or failing disk; return otherwise. With `whole`, a DiskFull from
    one of its files is restated for the whole (a folder written file by file)."""
    why = (getattr(e, "why", None) if whole else None) or disk_trouble(e)
    if why is None:
        return
    try:
        free_bytes = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
        free = f"{_size(free_bytes)} free there"
    except OSError:
        free_bytes, free = None, "free space unknown"
    if why == "disk full (or an I/O error)" and free_bytes is not None and free_bytes < max(needs, 1):
        why = "disk full"  # a wrapper that lost the errno, on a disk that is indeed full
    need = f"it needs {'more than' if at_least else 'about'} {_size(needs)}, " if needs else ""
    error = DiskFull(f"{why}: could not write {what + ' ' if what else ''}{path} ({need}{free}); {then}")
    error.why = why
    raise error from None


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def write_lines_atomic(path: str, lines: list[str]):
    with atomic_path(path, needs=sum(len(ln.encode()) for ln in lines)) as tmp, open(tmp, "w") as f:
        f.writelines(lines)


def write_json_atomic(path: str, obj, default=float):
    """JSON with indent 2; `default` converts what json cannot (numpy floats by default)."""
    text = json.dumps(obj, indent=2, default=default)
    with atomic_path(path, needs=len(text.encode())) as tmp, open(tmp, "w") as f:
        f.write(text)


def fsync_dir(folder: str):
    """Make a rename in `folder` durable (a power cut after it would otherwise undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(folder: str):
    """fsync every file in `folder` and the folder itself, before it is renamed into place."""
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(folder)


# ----------------------------------------------------------------------------- metrics.jsonl
# One JSON object per line, appended as the run goes. A crash (a kill, a power cut, a full disk)
# can cut the last line short: readers skip it and say so once, --resume cuts it off. A bad line
# with lines after it is damage, not a crash's trace: one line names the file and the line.
_told_partial: set[str] = set()


def append_metrics(path: str, entry: dict):
    """Append one line in one write; a failed write is undone (the file is cut back), so a full
    disk leaves the log as it was and says so in one line."""
    data = (json.dumps(entry) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            os.ftruncate(fd, start)  # needs no space
            raise_if_disk_full(e, "a line of", path, len(data))
            raise
    finally:
        os.close(fd)


def _scan_metrics(path: str) -> tuple[list[tuple[int, bytes, dict]], int | None]:
    """([(offset, raw line, entry)], offset of a partial last line or None)."""
    with open(path, "rb") as f:
        pieces = f.read().split(b"\n")
    lines, offset, partial = [], 0, None
    for i, raw in enumerate(pieces):
        start, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError(f"a {type(entry).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if any(p.strip() for p in pieces[i + 1:]):
                raise TrainingError(f"{path}, line {i + 1}: not a JSON object ({str(e)[:80]}); lines follow it, "
                                    f"so the file is damaged, not cut short by a crash: delete line {i + 1} "
                                    f"and run again") from None
            partial = start
            break
        lines.append((start, raw + (b"\n" if i < len(pieces) - 1 else b""), entry))
    return lines, partial


def read_metrics_file(path: str) -> list[dict]:
    """Every entry of a metrics.jsonl, in order. A partial last line is skipped, with a note on
    stderr (once per file): a crash's trace, or a line being written right now."""
    lines, partial = _scan_metrics(path)
    if partial is not None and path not in _told_partial:
        _told_partial.add(path)
        print(f"note: {path} ends in a partial line (a crash while it was written, or a write under way); "
              f"skipped it", file=sys.stderr)
    return [entry for _, _, entry in lines]


def forget_metrics_after(metrics_path: str, step: int):
    """Drop metrics.jsonl lines logged after `step` (the checkpoint's), and a partial last line,
    so the log matches the checkpoint and is valid JSONL before --resume appends to it. Lines are
    in step order, so this cuts the file short in place: it needs no free space on a full disk."""
    if not os.path.exists(metrics_path):
        return
    lines, partial = _scan_metrics(metrics_path)
    keep = [ln for ln in lines if ln[2].get("step", 0) <= step]
    if partial is not None:
        print(f"{metrics_path}: removed a partial last line (a crash while it was written)", file=sys.stderr)
    if keep != lines[:len(keep)]:  # not a prefix (an edited file): write the kept lines anew
        write_lines_atomic(metrics_path, [raw.decode().rstrip("\n") + "\n" for _, raw, _ in keep])
        return
    end = keep[-1][0] + len(keep[-1][1]) if keep else 0
    with open(metrics_path, "r+b") as f:
        f.truncate(end)
        if keep and not keep[-1][1].endswith(b"\n"):  # a whole last line that lost only its newline
            f.seek(end)
            f.write(b"\n")


# ----------------------------------------------------------------------------- one writer per OUT_DIR
@contextlib.contextmanager
def out_dir_lock(out_dir: str):
    """Hold OUT_DIR/run.lock (it holds the PID) while a run writes OUT_DIR; a second run refuses to start.
    The lock is an flock, which the kernel drops when its process dies, so a lock left behind by
    a killed run is simply taken over. Leftover temporary files of dead runs are removed."""
    lock_path = os.path.join(out_dir, LOCK_NAME)
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd = _take_lock(lock_path)
    except OSError as e:
        raise_if_disk_full(e, "the lock file", lock_path, then="nothing else was written: free some space and run again")
        raise TrainingError(f"cannot write to --out-dir {out_dir} ({e.strerror or e}); "
                            f"choose a folder you can write to") from None
    if fd is None:
        try:
            with open(lock_path) as f:
                holder = f.read().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise TrainingError(f"{out_dir} is in use by another run (pid {holder}, lock {lock_path}); "
                            f"wait for it to finish, stop it, or use another --out-dir")
    try:
        remove_stale_temps(out_dir)
        yield
    finally:
        os.remove(lock_path)  # before releasing the flock, so no one locks a file about to vanish
        os.close(fd)


def _take_lock(lock_path: str) -> int | None:
    """An fd holding the flock on `lock_path` with our PID written in it, or None if a live process holds it."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:  # the holder we waited on may have removed the file: then lock the new one instead
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            except OSError:  # a full disk: no lock file left behind
                os.remove(lock_path)
                os.close(fd)
                raise
            return fd
        os.close(fd)


def remove_stale_temps(out_dir: str, only: str | None = None):
    """atomic_path's NAME.tmp.PID files (and export's folders) whose writer is gone (a kill mid-save);
    with `only`, just those of NAME == only."""
    for name in os.listdir(out_dir):
        stem, sep, pid = name.rpartition(".tmp.")
        if sep and stem and only in (None, stem) and pid.isdigit() and not _process_alive(int(pid)):
            _remove(os.path.join(out_dir, name))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# ----------------------------------------------------------------------------- the twin layout
def find_runs(path: str) -> tuple[str, str | None, str]:
    """(ternary run, twin run or None, folder for verdict.json and PNGs).

    `path` is a run folder or its ckpt.pt. The twin layout OUT/ternary + OUT/fp is recognised
    from OUT or from OUT/ternary; anything else is a single run reported into its own folder."""
    run_dir = path.rstrip("/") if os.path.isdir(path) else os.path.dirname(path) or "."
    if os.path.isdir(os.path.join(run_dir, "ternary")):
        root, ternary = run_dir, os.path.join(run_dir, "ternary")
    elif os.path.basename(run_dir) == "ternary":
        root, ternary = os.path.dirname(run_dir) or ".", path
    else:
        return path, None, run_dir
    twin = os.path.join(root, "fp")
    return ternary, (twin if os.path.isdir(twin) else None), root
