"""How a run fails or stops: the error family, SIGTERM/SIGINT, and `run_main`, which turns both
into one line on stderr and an exit code. A leaf: it imports nothing from the package."""
import contextlib
import errno
import re
import signal
import sys
import traceback
import threading


class TrainingError(RuntimeError):
    """A problem the user must act on; run_main prints its one-line message and exits with `exit_code`."""
    exit_code = 2


class NonFiniteLoss(TrainingError):
    """The loss or the gradient became NaN/Inf: stopped before the update, exit code 3."""
    exit_code = 3


class Broken(TrainingError):
    """The verdict is BROKEN (printed above, in OUT_DIR/verdict.json): exit code 1, as check_layer's."""
    exit_code = 1


class DiskFull(TrainingError):
    """A write of ours failed: no space left (or a quota), or an I/O error. Exit code 4: the last
    good checkpoint is kept, and the same command (with --resume) continues once there is space."""
    exit_code = 4


# errnos of a full or failing disk, and the texts torch, safetensors and numpy wrap them in
# (torch.save: "[enforce fail at inline_container.cc:672] unexpected pos"; safetensors:
# "SafetensorError: ... No space left on device (os error 28)"; ndarray.tofile, an OSError
# without an errno: "3997 requested and 0 written")
DISK_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EIO: "I/O error"}
DISK_TEXTS = {"No space left on device": "disk full", "Disk quota exceeded": "disk quota exceeded",
              "Input/output error": "I/O error", "unexpected pos": "disk full (or an I/O error)"}
SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
AFTER_DISK_FULL = "the last good checkpoint is kept: free some space, then run the same command again (--resume continues a run)"


def disk_trouble(e: BaseException) -> str | None:
    """'disk full', 'I/O error', ... when `e` is a write that failed for want of space or a failing
    disk (an OSError, or torch's and safetensors' wrappers of one); None otherwise."""
    if isinstance(e, DiskFull) or not isinstance(e, Exception):
        return None
    cause = e.__cause__ or e.__context__  # torch.save's RuntimeError holds the OSError it swallowed
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        return DISK_ERRNOS[e.errno]
    if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
        return DISK_ERRNOS[cause.errno]
    if isinstance(e, OSError) and SHORT_WRITE.search(str(e)):
        return "disk full (or an I/O error)"
    return next((why for text, why in DISK_TEXTS.items() if text in str(e)), None)


class Interrupted(TrainingError):
    """SIGTERM or SIGINT: the checkpoint is saved; exit 128 + the signal's number, as a shell would."""

    def __init__(self, signum: int, step: int, ckpt_path: str):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {ckpt_path}; "
                         f"continue with --resume")


INTERNAL_ERROR = 70  # sysexits' EX_SOFTWARE: a bug of ours


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (torch's are often pages long), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def run_main(main):
    """Run `main()`, turning expected problems into one line on stderr and an exit code:
    0 done, 1 the verdict is BROKEN, 2 bad input, 3 non-finite loss, 4 disk full (or failing), 130/143 stopped
    by SIGINT/SIGTERM after saving. A disk error that no writer of ours named (a library's own write) still
    gets one line. Anything else is a bug of ours: its traceback and exit 70 (EX_SOFTWARE), never the 1 that
    Python would give it, which a script would read as a BROKEN verdict."""
    try:
        return main()
    except Exception as e:  # noqa: BLE001 - only the expected kinds get one line; the rest print their traceback
        if disk_trouble(e):
            e = DiskFull(f"{disk_trouble(e)}: {first_line(e)}; {AFTER_DISK_FULL}")
        elif not isinstance(e, (TrainingError, ValueError, OSError, UnicodeDecodeError)):
            traceback.print_exc()
            print(f"internal error (a bug of this tool, not of your stack): {first_line(e)}", file=sys.stderr)
            sys.exit(INTERNAL_ERROR)
        code = getattr(e, "exit_code", 2)
        print(f"{'stopped' if code > 128 else 'verdict' if code == 1 else 'error'}: {e}", file=sys.stderr)
        sys.exit(code)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact, continue with --resume", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- SIGTERM / SIGINT
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_stop_signal: list[int] = []  # the signal received while stop_on_signals() is active, if any


def stop_requested() -> int | None:
    """The SIGTERM/SIGINT received inside stop_on_signals(), or None."""
    return _stop_signal[0] if _stop_signal else None


@contextlib.contextmanager
def stop_on_signals():
    """Inside: SIGTERM and SIGINT ask the training loop to save a checkpoint after the current step
    and raise Interrupted (exit 143 / 130). Outside, both keep their usual effect."""
    def ask(signum, frame):
        if not _stop_signal:
            _stop_signal.append(signum)
            try:  # stderr may be a pipe whose reader is gone: that must not stop the save
                print(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping",
                      file=sys.stderr, flush=True)
            except (OSError, ValueError):
                pass

    if threading.current_thread() is not threading.main_thread():  # handlers can only live there
        yield
        return
    old = {s: signal.signal(s, ask) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _stop_signal.clear()
