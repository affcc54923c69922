"""Following `cfg` from run_experiment to the first training step reads each file at most twice.

What a reader follows is call sites: each call that hands a config to another file is one visit
to that file, counted once per call site (a loop over layers is one visit). The config's own
methods (config_tiny.py) are the config, not a place it goes. The path is recorded with
sys.setprofile on a real run of the arithmetic script, stopped at its first training step."""
import os
import sys
from collections import Counter

import pytest

import bitnet
from bitnet import trainer
from bitnet.config_tiny import BitNetConfig

from conftest import REPO_ROOT

PACKAGE = os.path.dirname(bitnet.__file__)


class FirstStep(Exception):
    pass


def visits_of_cfg(run) -> tuple[Counter, list[str]]:
    """{file: call sites that hand it a BitNetConfig from another file}, and the path in order."""
    sites, path = set(), []

    def profile(frame, event, arg):
        if event != "call" or not frame.f_code.co_filename.startswith(PACKAGE):
            return
        callee = os.path.relpath(frame.f_code.co_filename, PACKAGE)
        caller = frame.f_back  # the nearest frame of ours up the stack (torch may sit between), else the next one
        while caller.f_back is not None and not caller.f_code.co_filename.startswith(PACKAGE):
            caller = caller.f_back
        if not caller.f_code.co_filename.startswith(PACKAGE):
            caller = frame.f_back
        if callee == "config_tiny.py" or caller.f_code.co_filename == frame.f_code.co_filename:
            return
        if any(isinstance(v, BitNetConfig) for v in frame.f_locals.values()):
            site = (caller.f_code.co_filename, caller.f_lineno, callee)
            if site not in sites:
                sites.add(site)
                path.append(f"{callee}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        run()
    except FirstStep:
        pass
    finally:
        sys.setprofile(None)
    return Counter(p.split(":")[0] for p in path), path


def test_the_counter_sees_a_file_entered_from_two_call_sites():
    from bitnet import build, schedule
    cfg = BitNetConfig()

    def ping_pong():
        schedule.TimeBudget(cfg, 0)
        build.with_data_bug(None, cfg)
        schedule.TimeBudget(cfg, 0)  # another call site: a second visit

    counts, _ = visits_of_cfg(ping_pong)
    assert counts["schedule.py"] == 2 and counts["build.py"] == 1


def test_cfg_visits_each_file_at_most_twice_on_the_way_to_the_first_step(tmp_path, monkeypatch):
    sys.path.insert(0, REPO_ROOT)
    import train_bitnet_arithmetic as script

    def first_step(run):
        raise FirstStep

    monkeypatch.setattr(trainer, "train_step", first_step)
    monkeypatch.setattr(sys, "argv", ["train_bitnet_arithmetic.py", "--out-dir", str(tmp_path / "run"),
                                      "--max-steps", "3", "--quiet", "--set", "compile=false"])
    counts, path = visits_of_cfg(script.main)
    assert "build.py:prepare_run" in path and "build.py:training_stack" in path, path  # the run was followed
    assert any(p.startswith("trainer.py") for p in path), path
    assert max(counts.values()) <= 2, f"{counts.most_common(3)}: {' -> '.join(path)}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
