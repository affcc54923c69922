"""A run folder (OUT_DIR): its file names, atomic writes, the one-writer lock, and the twin layout.

    OUT_DIR/ckpt.pt  ckpt.prev.pt  metrics.jsonl  summary.json  run.lock    one run
    OUT_DIR/ternary/  OUT_DIR/fp/  (+ the pair's summary.json, verdict.json)  a --twin run
"""
import contextlib
import fcntl
import json
import os

from .errors import TrainingError

CKPT_NAME = "ckpt.pt"
PREV_CKPT_NAME = "ckpt.prev.pt"  # the good checkpoint before the latest one
METRICS_NAME = "metrics.jsonl"
LOCK_NAME = "run.lock"


def previous_checkpoint(path: str) -> str:
    """OUT_DIR/ckpt.prev.pt beside OUT_DIR/ckpt.pt."""
    return os.path.join(os.path.dirname(path), PREV_CKPT_NAME)


# ----------------------------------------------------------------------------- atomic writes
@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path beside `path`; on success rename it over `path`, on failure remove it.
    A crash or a full disk never leaves half a file where a good one was."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_lines_atomic(path: str, lines: list[str]):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(lines)


def write_json_atomic(path: str, obj, default=float):
    """JSON with indent 2; `default` converts what json cannot (numpy floats by default)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=default)


def fsync_dir(folder: str):
    """Make a rename in `folder` durable (a power cut after it would otherwise undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def forget_metrics_after(metrics_path: str, step: int):
    """Drop metrics.jsonl lines logged after `step` (the checkpoint's), so the log matches it."""
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            keep = [ln for ln in f if json.loads(ln).get("step", 0) <= step]
        write_lines_atomic(metrics_path, keep)


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
        _remove_stale_temp_files(out_dir)
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
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


def _remove_stale_temp_files(out_dir: str):
    """atomic_path's NAME.tmp.PID files whose writer is gone (a kill mid-save); we are the only writer now."""
    for name in os.listdir(out_dir):
        stem, sep, pid = name.rpartition(".tmp.")
        path = os.path.join(out_dir, name)
        if sep and stem and pid.isdigit() and os.path.isfile(path) and not _process_alive(int(pid)):
            os.remove(path)


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
