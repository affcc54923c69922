"""What every task builds on, with no imports from this package: the codec of a text
tokenizer (TinyStories, FineWeb-Edu, a transformers folder made elsewhere) and the unigram
baseline a model must beat. The contract itself, and the registry, are in tasks.py."""
import math
from collections import Counter
from dataclasses import dataclass


def unigram_loss(get_batch, n_batches: int = 20, batch_size: int = 32) -> float:
    """Cross-entropy of the best context-free guess (the training targets' own frequencies):
    a model that beats it has learned something beyond token counts."""
    counts = Counter()
    for step in range(n_batches):
        _, y = get_batch(step, batch_size)
        counts.update(y[y != -100].tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


@dataclass
class TextCodec:
    """A `tokenizers.Tokenizer` as inference needs it. Free text is written the same way by a
    person and by the model, so to_model() and display() change nothing."""
    tokenizer: object  # tokenizers.Tokenizer; evaluate --text scores with it
    stop_id: int | None  # generation stops at this token
    prefix: tuple[int, ...] = ()  # what training puts before every document (<|endoftext|>)
    pad_id: int | None = None
    max_new_tokens: int = 200
    kind = "text"  # evaluate --text

    def to_model(self, text: str) -> str:
        return text

    def display(self, text: str) -> str:
        return text

    def encode(self, text: str) -> list[int]:
        return [*self.prefix, *self.tokenizer.encode(text).ids]

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def save_pretrained(self, out_dir: str) -> dict:
        """tokenizer.json and its config for transformers.AutoTokenizer; a prompt there gets the
        same prefix as training gave every document. Returns the ids config.json names."""
        from tokenizers import Tokenizer, processors
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer.from_str(self.tokenizer.to_str())  # a copy: the template is for transformers only
        names = [tok.id_to_token(i) for i in self.prefix]
        if names:
            tok.post_processor = processors.TemplateProcessing(single=" ".join([*names, "$A"]),
                                                               special_tokens=list(zip(names, self.prefix)))
        name = lambda i: None if i is None else tok.id_to_token(i)  # noqa: E731
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=names[0] if names else None,
                                eos_token=name(self.stop_id), pad_token=name(self.pad_id),
                                clean_up_tokenization_spaces=False).save_pretrained(out_dir)  # cleanup breaks round trips
        return {"bos": self.prefix[0] if self.prefix else None, "stop": self.stop_id, "pad": self.pad_id,
                "max_new_tokens": self.max_new_tokens}
