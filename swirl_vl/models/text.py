"""Local text tokenizers for tiny models: byte-level BPE trained on a small seed corpus.

Byte-level means any string round-trips (Aurora-Bench instructions included); the seed corpus makes the
sprite-world grammar cheap (a word is usually one token). Nothing is downloaded.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
_SHAPES = ("square", "circle", "triangle")
_SEED_CORPUS = (
    [f"move the {c} {s} {d}" for c in _COLOURS for s in _SHAPES for d in ("left", "right", "up", "down")]
    + [f"paint the {c} {s} {c2}" for c in _COLOURS for s in _SHAPES for c2 in _COLOURS]
    + [f"remove the {c} {s}" for c in _COLOURS for s in _SHAPES]
    + [f"add a {c} {s} at row {r} column {k}" for c in _COLOURS for s in _SHAPES for r in range(8) for k in range(8)]
    + [
        "Which action turns the first image into the second?",
        "Edit the image: make the man stand up, open the door, put the cup on the table, remove the dog.",
        "Let the blanket be longer and hang over the bed. Turn the remote into a headset. Move it behind.",
        "Make her lower both arms. Put the book left of the cup, right of the knife, in front of the bowl.",
    ]
)

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


def build_text_tokenizer(
    special_tokens: list[str] | tuple[str, ...] = (), vocab_size: int = 512, extra_corpus: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``<|pad|> <|bos|> <|eos|>`` plus ``special_tokens``.

    Deterministic: the same arguments give the same vocabulary.
    """
    tok = byte_level_bpe([PAD, BOS, EOS, *special_tokens], vocab_size, extra_corpus)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=list(special_tokens),
    )


def byte_level_bpe(specials: list[str], vocab_size: int, extra_corpus: list[str] | None = None) -> Tokenizer:
    """A byte-level BPE (GPT-2's and Qwen's kind) trained on the seed corpus, ``specials`` first. Deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_SEED_CORPUS) + list(extra_corpus or []), trainer=trainer)
    return tok


def byte_fallback_bpe(specials: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of a BPE with byte fallback and ``▁`` for spaces (as Gemma's and Llama's
    SentencePiece tokenizers), trained on the seed corpus with ``specials`` first. Deterministic."""
    import json

    from tokenizers import normalizers

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback: any string round-trips
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_tokens, show_progress=False)
    tok.train_from_iterator(list(_SEED_CORPUS), trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    return dict(bpe["vocab"]), [tuple(m) for m in bpe["merges"]]
