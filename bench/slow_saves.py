"""Run a train script whose checkpoint writer pauses after writing and before its rename, so that
bench/chaos.py can land kill -9s inside a checkpoint write. The pause is patched in from here,
outside the library: the production writer has no test switch.

    python bench/slow_saves.py SECONDS train_bitnet_arithmetic.py --out-dir runs/x ...
"""
import contextlib
import os
import runpy
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
from bitnet import checkpoint  # noqa: E402
from bitnet.rundir import CKPT_NAME  # noqa: E402


def slow_atomic_path(delay_s: float, atomic_path=checkpoint.atomic_path):
    """rundir.atomic_path, sleeping `delay_s` before ckpt.pt's rename (after ckpt.prev.pt is linked)."""
    @contextlib.contextmanager
    def slow(path: str, *args, **kwargs):
        with atomic_path(path, *args, **kwargs) as tmp:
            yield tmp
            if os.path.basename(path) == CKPT_NAME:
                time.sleep(delay_s)
    return slow


def main():
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} SECONDS SCRIPT [ARGS...]")
    delay, script, *args = sys.argv[1:]
    checkpoint.atomic_path = slow_atomic_path(float(delay))  # what save_checkpoint calls
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
