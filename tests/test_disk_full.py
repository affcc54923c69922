"""A crash mid-line or a full disk never costs a run (issue 28).

metrics.jsonl: a partial last line (a kill mid-append) is skipped with one note and cut off by
--resume; a damaged line with lines after it is named by its number (exit 2).
A full disk: every write of ours ends in one line naming what, where and the space it needs
(exit 4); the last good checkpoint loads, no temporary file stays, no export folder looks whole
unless it is. Each case runs with the write error injected (always), and on a real 2 MB tmpfs
where this process may mount one (root with the capability; skipped elsewhere)."""
import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from test_reliability import ARITH, REPO, TINY_ARITH, arith_run, run_dir, run_tool, snapshot  # noqa: F401 (fixtures)

RESUME = ["--resume", "--max-steps", "12", "--set", "eval_interval=4", "--no-verdict", *TINY_ARITH]


def assert_disk_full(result, *needles):
    code, lines = result
    assert code == 4, lines
    assert len(lines) == 1 and lines[0].startswith("error: disk full: could not write "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def temp_files(folder: str) -> list[str]:
    return [n for _, dirs, files in os.walk(folder) for n in dirs + files if ".tmp." in n]


def jsonl(path: str) -> list[dict]:
    """The entries of a valid JSONL file: every line an object, the last one ending in a newline."""
    with open(path) as f:
        text = f.read()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def eval_steps(out: str) -> list[int]:
    return [e["step"] for e in jsonl(os.path.join(out, "metrics.jsonl")) if e["kind"] == "eval"]


def ckpt_step(out: str) -> int:
    from bitnet.checkpoint import load_checkpoint
    return load_checkpoint(out)["step"]


# ---------------------------------------------------------------- metrics.jsonl after a crash
def test_the_reader_skips_a_partial_last_line_once_and_names_damage(tmp_path, capsys):
    from bitnet.errors import TrainingError
    from bitnet.rundir import forget_metrics_after, read_metrics_file

    path = str(tmp_path / "metrics.jsonl")
    entries = [{"kind": "train", "step": s} for s in (10, 20, 30)]
    whole = "".join(json.dumps(e) + "\n" for e in entries)
    with open(path, "w") as f:
        f.write(whole + '{"kind": "eval", "st')
    assert read_metrics_file(path) == entries and read_metrics_file(path) == entries
    assert capsys.readouterr().err.count("ends in a partial line") == 1  # said once
    forget_metrics_after(path, 20)  # what --resume does: after the checkpoint's step, and the partial line
    assert open(path).read() == "".join(json.dumps(e) + "\n" for e in entries[:2])
    with open(path, "w") as f:
        f.write(whole.rstrip("\n"))  # a whole last line that lost only its newline: kept, and given one
    assert read_metrics_file(path) == entries
    forget_metrics_after(path, 30)
    assert open(path).read() == whole
    with open(path, "w") as f:  # steps out of order (an edited file): the kept lines are written anew
        f.write("".join(json.dumps({"kind": "train", "step": s}) + "\n" for s in (10, 30, 20)))
    forget_metrics_after(path, 20)
    assert [e["step"] for e in jsonl(path)] == [10, 20]
    with open(path, "w") as f:
        f.write(json.dumps(entries[0]) + '\n{"kind": "tr\n' + json.dumps(entries[2]) + "\n")
    with pytest.raises(TrainingError, match=r"metrics.jsonl, line 2: .*damaged.*delete line 2"):
        read_metrics_file(path)


def test_a_run_whose_metrics_end_in_a_partial_line_is_diagnosed_evaluated_and_resumed(capsys, run_dir, tmp_path):
    out, _ = run_dir
    metrics = os.path.join(out, "metrics.jsonl")
    before = open(metrics).read()
    with open(metrics, "a") as f:
        f.write('{"kind": "eval", "step": 2')  # what a kill mid-append leaves
    code, lines = run_tool(capsys, "diagnose", ["--checkpoint", out, "--write"])
    assert code == 0 and [ln for ln in lines if "partial line" in ln] == [
        f"note: {metrics} ends in a partial line (a crash while it was written, or a write under way); skipped it"]
    assert os.path.exists(os.path.join(out, "loss_curves.png"))  # the plots read it too
    problems = tmp_path / "problems.txt"
    problems.write_text("2 * 3 = 6\n")
    assert run_tool(capsys, "evaluate", ["--checkpoint", out, "--arithmetic", str(problems)])[0] == 0
    code, lines = run_tool(capsys, ARITH, ["--out-dir", out, *RESUME])
    assert code == 0 and any("removed a partial last line" in ln for ln in lines), lines
    assert open(metrics).read().startswith(before)  # the whole lines stay byte for byte
    assert eval_steps(out) == [0, 4, 8, 12]  # valid JSONL again, the cut line gone


def test_a_damaged_line_in_the_middle_is_named(capsys, run_dir):
    out, _ = run_dir
    metrics = os.path.join(out, "metrics.jsonl")
    lines = open(metrics).readlines()
    lines[1] = lines[1][:25] + "\n"
    with open(metrics, "w") as f:
        f.writelines(lines)
    before = snapshot(out)
    for tool, argv in (("diagnose", ["--checkpoint", out]), (ARITH, ["--out-dir", out, *RESUME])):
        code, err = run_tool(capsys, tool, argv)
        assert code == 2 and len(err) == 1, err
        assert f"{metrics}, line 2: not a JSON object" in err[0] and "delete line 2" in err[0], err
    assert snapshot(out) == before


# ---------------------------------------------------------------- disk full, injected
class FillsUp:
    """A file on a disk with `room` bytes left: the write that crosses it writes what fits and raises
    ENOSPC, as the OS does (torch.save turns it into 'unexpected pos')."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        if self.f.tell() + len(data) > self.room:
            self.f.write(bytes(data)[: max(0, self.room - self.f.tell())])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_disk_full_during_a_checkpoint_write(capsys, run_dir, monkeypatch):
    out, before = run_dir
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real(obj, FillsUp(f, 4096), *a, **k))
    assert_disk_full(run_tool(capsys, ARITH, ["--out-dir", out, *RESUME]), f"the checkpoint {out}/ckpt.pt",
                     "it needs about", "free there", "still holds the last good checkpoint", "continue with --resume")
    assert snapshot(out) == before and not temp_files(out)  # metrics.jsonl rolled back to the checkpoint
    assert ckpt_step(out) == 8


def test_disk_full_during_a_metrics_write_then_resume(capsys, run_dir, monkeypatch):
    out, before = run_dir
    real = os.write

    def write(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("metrics.jsonl"):
            real(fd, bytes(data)[:7])  # part of the line reaches the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)
    assert_disk_full(run_tool(capsys, ARITH, ["--out-dir", out, *RESUME]), f"a line of {out}/metrics.jsonl",
                     "the last good checkpoint is kept", "--resume")
    assert snapshot(out) == before and not temp_files(out)  # the half line was taken back
    assert ckpt_step(out) == 8
    monkeypatch.undo()  # space again: --resume continues
    assert run_tool(capsys, ARITH, ["--out-dir", out, *RESUME])[0] == 0
    assert eval_steps(out) == [0, 4, 8, 12] and ckpt_step(out) == 12


def test_disk_full_during_an_export(capsys, run_dir, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    out, _ = run_dir
    earlier = os.path.join(os.path.dirname(out), "earlier")
    assert run_tool(capsys, "export", ["--checkpoint", out, "--out", earlier])[0] == 0
    earlier_files = snapshot(earlier)
    real = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):  # half the file, then safetensors' own error
        real(tensors, filename, metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    fresh = os.path.join(os.path.dirname(out), "fresh")
    for target in (fresh, earlier):
        assert_disk_full(run_tool(capsys, "export", ["--checkpoint", out, "--out", target]),
                         f"the export {target}", "it needs about", "nothing was exported")
    assert not os.path.exists(fresh)  # no folder that looks complete
    assert snapshot(earlier) == earlier_files  # an earlier export stays whole
    assert not temp_files(os.path.dirname(out))


# ---------------------------------------------------------------- disk full, on a real small disk
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs; skipped where it cannot be mounted (not root, or a container without the capability)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield str(disk)
    subprocess.run(["umount", str(disk)], capture_output=True)


def fill(disk: str, leave: int):
    """Fill `disk` until about `leave` bytes are free."""
    with open(os.path.join(disk, "filler"), "ab") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(disk).free - leave))


def test_full_tmpfs_checkpoint_then_resume(capsys, run_dir, small_disk):
    out = os.path.join(small_disk, "run")
    shutil.copytree(run_dir[0], out)
    before = snapshot(out)
    fill(small_disk, 100_000)  # a checkpoint needs about 190 kB
    assert_disk_full(run_tool(capsys, ARITH, ["--out-dir", out, *RESUME]), f"the checkpoint {out}/ckpt.pt",
                     "still holds the last good checkpoint")
    assert snapshot(out) == before and not temp_files(out) and ckpt_step(out) == 8
    os.remove(os.path.join(small_disk, "filler"))
    assert run_tool(capsys, ARITH, ["--out-dir", out, *RESUME])[0] == 0 and eval_steps(out) == [0, 4, 8, 12]


def test_full_tmpfs_metrics(capsys, run_dir, small_disk, monkeypatch):
    import bitnet.experiment

    out = os.path.join(small_disk, "run")
    shutil.copytree(run_dir[0], out)
    metrics = os.path.join(out, "metrics.jsonl")
    block = os.statvfs(small_disk).f_bsize  # tmpfs hands out whole pages: fill the log's last one
    pad = -(os.path.getsize(metrics) + 40) % block + 40
    with open(metrics, "a") as f:
        f.write(json.dumps({"kind": "note", "step": 8, "pad": "x" * (pad - 39)}) + "\n")
    assert os.path.getsize(metrics) % block == 0
    before = snapshot(out)
    real = bitnet.experiment.train

    def train(*args, **kwargs):  # the disk fills up once the run holds its lock
        fill(small_disk, 0)
        return real(*args, **kwargs)

    monkeypatch.setattr(bitnet.experiment, "train", train)
    assert_disk_full(run_tool(capsys, ARITH, ["--out-dir", out, *RESUME]), f"a line of {metrics}")
    assert snapshot(out) == before and not temp_files(out) and ckpt_step(out) == 8


def test_full_tmpfs_export(capsys, run_dir, small_disk):
    target = os.path.join(small_disk, "exported")
    fill(small_disk, 30_000)  # the export needs about 60 kB
    assert_disk_full(run_tool(capsys, "export", ["--checkpoint", run_dir[0], "--out", target]),
                     f"the export {target}", "nothing was exported")
    assert os.listdir(small_disk) == ["filler"]


# ---------------------------------------------------------------- readers while a run writes
def test_readers_keep_working_while_a_run_writes(capsys, tmp_path):
    """generate and the metrics reader against a run that checkpoints every step and appends its log."""
    from bitnet.rundir import read_metrics_file

    out = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, ARITH, "--out-dir", out, "--max-steps", "100000", "--no-verdict",
                             "--set", "eval_interval=25", "--set", "checkpoint_interval_s=0", *TINY_ARITH],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, "ckpt.pt")) and time.time() < deadline:
            time.sleep(0.2)
        steps = []
        for _ in range(6):
            code, lines = run_tool(capsys, "generate", ["--checkpoint", out, "--prompt", "2 * 3 ="])
            assert code == 0, lines
            assert read_metrics_file(os.path.join(out, "metrics.jsonl"))
            steps.append(ckpt_step(out))
        assert proc.poll() is None and steps == sorted(steps) and steps[-1] > steps[0]  # it wrote all along
    finally:
        proc.terminate()
        proc.wait(60)


def test_every_other_writer_names_a_full_disk(small_disk, tmp_path):
    """Summary and verdict (write_json_atomic), plots, tokenizer and token cache on a disk with no room:
    one line each naming what and where, and nothing left behind but empty folders."""
    from bitnet.text_tokenizer import save_tokenizer, train_bpe
    from bitnet.data_tinystories import build_token_cache, iter_stories
    from bitnet.diagnose.plots import plot_loss_curves
    from bitnet.errors import DiskFull
    from bitnet.rundir import write_json_atomic

    text = tmp_path / "train.txt"
    text.write_text("".join(f"the cat {'sat ' * (i % 7)}on the mat.\n<|endoftext|>\n" for i in range(400)))
    tok = train_bpe(iter_stories(str(text)), 280, show_progress=False)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"kind": "eval", "step": s, "val_loss": 3.0 / (s + 1)}) + "\n"
                               for s in range(0, 50, 10)))
    at = lambda name: os.path.join(small_disk, name)  # noqa: E731
    writes = {"": lambda: write_json_atomic(at("summary.json"), {"history": list(range(5000))}),
              "the plot": lambda: plot_loss_curves({"run": str(metrics)}, at("loss_curves.png")),
              "the tokenizer": lambda: save_tokenizer(tok, at("tok")),
              "the token cache": lambda: build_token_cache(str(text), tok, at("cache/train.bin"))}
    fill(small_disk, 0)
    for what, write in writes.items():
        with pytest.raises(DiskFull) as caught:
            write()
        message = str(caught.value)
        assert message.startswith("disk full: could not write ") and "\n" not in message, message
        assert f"{what} {small_disk}" in message if what else f"write {at('summary.json')} (it needs" in message
    left = [os.path.join(r, n) for r, _, files in os.walk(small_disk) for n in files]
    assert left == [at("filler")]
