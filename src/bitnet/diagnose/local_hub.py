"""Point a loader's `datasets.load_dataset("owner/name", ...)` at local files, without editing it.

    with hub_to_local({"roneneldan/TinyStories": {None: ["train.txt"], "validation": ["valid.txt"]}}):
        batches = their_module.make_loader()      # its load_dataset(...) now reads the local files

While the context is open, `datasets.load_dataset` (and `datasets.load.load_dataset`, what
`from datasets import load_dataset` binds) is replaced by a function that serves the mapped hub
names from local files and passes every other call through. Open it before the user's module
is imported, so a module-level `from datasets import load_dataset` binds the redirect.
Files: .txt in the TinyStories format (documents split at lines `<|endoftext|>`; without that
marker one document per line), .jsonl/.json or .parquet with a `text` field. Each row is
{"text": document}, streamed when the caller asked for streaming=True. A split missing from
the mapping uses the files mapped to None (all splits). Works with HF_HUB_OFFLINE=1.
"""
import contextlib
import os

EOT = "<|endoftext|>"


def parse_mapping(items) -> dict:
    """['owner/name=FILE', 'owner/name:validation=FILE', ...] -> {name: {split or None: [files]}}."""
    out = {}
    for item in items or ():
        key, sep, path = item.partition("=")
        if not sep or not key or not path:
            raise ValueError(f"--local-dataset {item!r} must be NAME=FILE or NAME:SPLIT=FILE")
        if not os.path.isfile(path):
            raise ValueError(f"--local-dataset {item!r}: no file {path}")
        name, _, split = key.partition(":")
        out.setdefault(name, {}).setdefault(split or None, []).append(os.path.abspath(path))
    return out


def text_rows(files):
    for path in files:
        with open(path, encoding="utf-8") as f:
            if EOT not in f.read(1 << 20):
                f.seek(0)
                yield from ({"text": line.rstrip("\n")} for line in f if line.strip())
                continue
            f.seek(0)
            doc = []
            for line in f:
                if line.strip() == EOT:
                    if "".join(doc).strip():
                        yield {"text": "".join(doc).strip()}
                    doc = []
                else:
                    doc.append(line)
            if "".join(doc).strip():
                yield {"text": "".join(doc).strip()}


def local_split(original, files: list[str], streaming: bool):
    import datasets
    kinds = {"parquet" if f.endswith(".parquet") else "json" if f.endswith((".json", ".jsonl")) else "text"
             for f in files}
    if kinds == {"parquet"} or kinds == {"json"}:
        return original(kinds.pop(), data_files=files, split="train", streaming=streaming)
    if kinds != {"text"}:
        raise ValueError(f"local files of mixed kinds: {files}")
    features = datasets.Features({"text": datasets.Value("string")})  # known up front, as the hub's are
    if streaming:
        return datasets.IterableDataset.from_generator(text_rows, features=features, gen_kwargs={"files": files})
    return datasets.Dataset.from_list(list(text_rows(files)), features=features)


@contextlib.contextmanager
def hub_to_local(mapping: dict):
    """Serve the hub names in `mapping` ({name: {split or None: [files]}}) from local files."""
    if not mapping:
        yield
        return
    import datasets
    import datasets.load
    original = datasets.load.load_dataset

    def load_dataset(path, name=None, *args, split=None, streaming=False, **kwargs):
        splits = mapping.get(path)
        if splits is None:
            return original(path, name, *args, split=split, streaming=streaming, **kwargs)

        def files_of(s):
            base = (s or "").split("[")[0] or None
            got = splits.get(base) or splits.get(None)
            if got is None:
                raise ValueError(f"--local-dataset maps no file to split {s!r} of {path}")
            return got
        if split is not None:
            return local_split(original, files_of(split), streaming)
        names = sorted({s for s in splits if s} | ({"train", "validation"} if None in splits else set()))
        parts = {s: local_split(original, files_of(s), streaming) for s in names}
        return (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)(parts)

    datasets.load_dataset = datasets.load.load_dataset = load_dataset
    try:
        yield
    finally:
        datasets.load_dataset = datasets.load.load_dataset = original
