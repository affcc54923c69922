"""How a run fails or stops: the error family, SIGTERM/SIGINT, and `run_main`, which turns both
into one line on stderr and an exit code. A leaf: it imports nothing from the package."""
import contextlib
import signal
import sys
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


class Interrupted(TrainingError):
    """SIGTERM or SIGINT: the checkpoint is saved; exit 128 + the signal's number, as a shell would."""

    def __init__(self, signum: int, step: int, ckpt_path: str):
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; saved {ckpt_path}; "
                         f"continue with --resume")


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (torch's are often pages long), or its type's name."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


def run_main(main):
    """Run `main()`, turning expected problems into one line on stderr and an exit code:
    0 done, 1 the verdict is BROKEN, 2 bad input, 3 non-finite loss, 130/143 stopped by SIGINT/SIGTERM
    after saving."""
    try:
        return main()
    except (TrainingError, ValueError, OSError, UnicodeDecodeError) as e:
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
