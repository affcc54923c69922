"""The one contract every task keeps, and the one way a tool gets a checkpoint's codec.

A task is what the trainer runs (ArithmeticTask, TinyStoriesTask, FineWebTask); its codec is
what generate, evaluate and export need to read and write its text. A checkpoint stores the
task's identity() (a dict naming the task, with its tokenizer); codec_for(identity) rebuilds
the codec from it through the registry below, so the tools never ask which task a run was.
A new task implements Task and calls register(ItsClass) once.
"""
from typing import Protocol

import torch

from .data_arithmetic import ArithmeticTask
from .data_fineweb import FineWebTask
from .data_tinystories import TinyStoriesTask
from .text_tokenizer import foreign_text_codec
from .data_user import UserDataTask
from .taskkit import TextCodec, unigram_loss  # noqa: F401 - what a task of your own builds on


class Codec(Protocol):
    """Text <-> token ids for one task, in two forms: the model's (the training format, e.g.
    '07 + 12 = 910' for a padded, reversed arithmetic run) and a person's ('7 + 12 = 19')."""
    kind: str  # "problems" (lines like '12 + 7 = 19': evaluate --arithmetic) or "text" (evaluate --text)
    stop_id: int | None  # generation stops at this token
    max_new_tokens: int  # generate's default length
    tokenizer: object | None  # a tokenizers.Tokenizer for text metrics; None when there is none

    def to_model(self, text: str) -> str: ...  # a person's text as the model was trained to read and write it
    def display(self, text: str) -> str: ...  # the model's text as a person writes it
    def encode(self, text: str) -> list[int]: ...  # model-form text -> ids, with what training puts first
    def decode(self, ids) -> str: ...  # ids -> the model's own text
    def save_pretrained(self, out_dir: str) -> dict: ...  # tokenizer files; {bos, stop, pad, max_new_tokens} ids


class Task(Protocol):
    """What the trainer and the diagnosis need from an experiment. Optional, where a task has
    them: solved(metrics) (stop_when_solved); get_rank_batch, state_dict and load_state_dict (a
    streamed task's own batches and position, distributed.py); identity_of_tokenizer (register);
    heldout_documents(config, n) (a task that can write its own held-out text: check_model);
    from_checkpoint(config, identity) (a task that rebuilds itself from a checkpoint alone: diagnose)."""
    name: str  # identity()["task"]: the key of the registry
    learning_kwargs: dict  # how the diagnosis decides the model learns (detectors.detect_learning)
    metric_keys: list[str]  # the evaluation figures the twin comparison prints

    def identity(self) -> dict: ...  # stored in every checkpoint; codec_for() reads it back
    def get_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]: ...  # (x, y), y -100 = ignored
    def evaluate(self, model, device, step: int) -> dict: ...  # metrics; "samples": lines to print
    def format_eval(self, m: dict) -> str: ...  # one log line of evaluate()'s metrics
    def milestones(self) -> dict[str, float]: ...  # {label: loss} lines the twin comparison marks
    def diagnosis_inputs(self, model) -> dict: ...  # extra keyword inputs of diagnose_run
    @staticmethod
    def codec(identity: dict) -> Codec: ...  # the codec of a checkpoint with this identity


TASKS: dict[str, type] = {}  # identity()["task"] -> the task class


def register(task: type) -> type:
    """Make checkpoints of `task` readable by every tool: it needs a `name` and a static
    `codec(identity)`; an optional `identity_of_tokenizer(tokenizer_json)` claims transformers
    folders made elsewhere whose tokenizer is the task's own."""
    TASKS[task.name] = task
    return task


class TextFolder:
    """The task of a transformers folder made elsewhere: free text, its own tokenizer.json."""
    name = "text"
    codec = staticmethod(foreign_text_codec)


for builtin in (ArithmeticTask, TinyStoriesTask, FineWebTask, UserDataTask, TextFolder):
    register(builtin)


def codec_for(identity: dict) -> Codec:
    """The codec of a checkpoint, from the task identity it stored."""
    name = (identity or {}).get("task")
    if name not in TASKS:
        raise ValueError(f"checkpoint was trained on an unknown task {name!r} (known: {', '.join(sorted(TASKS))}); "
                         f"a task of your own makes its checkpoints readable with bitnet.tasks.register")
    return TASKS[name].codec(identity)


def heldout_documents(identity: dict, config, n: int) -> list[str] | None:
    """n held-out documents of a checkpoint's task, written as it trained on them, when the task
    can make its own (arithmetic problems); None for a task whose held-out text the user gives."""
    task = TASKS.get((identity or {}).get("task"))
    make = getattr(task, "heldout_documents", None)
    return make(config, n) if make else None


def task_from_checkpoint(identity: dict, config):
    """The task of a checkpoint, rebuilt from its config and identity, when the task needs nothing
    else (arithmetic: its problems are generated); None for one that needs its data files."""
    task = TASKS.get((identity or {}).get("task"))
    make = getattr(task, "from_checkpoint", None)
    return make(config, identity) if make else None


def identity_of_tokenizer(tokenizer_json: str, eos_token_id: int | None) -> dict:
    """Task identity for a transformers folder made elsewhere, from its tokenizer.json: a task
    that recognises the tokenizer as its own claims it; anything else is plain text."""
    for task in TASKS.values():
        identity = getattr(task, "identity_of_tokenizer", lambda _: None)(tokenizer_json)
        if identity:
            return identity
    return {"task": TextFolder.name, "tokenizer": tokenizer_json, "eos_token_id": eos_token_id}
