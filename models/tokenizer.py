"""An offline byte-level CLIP tokenizer for models built with ``weights="random"``.

A random-weight text encoder gives meaningless embeddings whatever the token ids are, so a
real 49k-token vocabulary (which would need a download) buys nothing there. This tokenizer
has CLIP's pre-processing and special tokens, and one token per byte (512 + 2 ids), so it
fits every CLIP vocabulary and runs with no files at all. Pretrained models always use
their own tokenizer.
"""

from __future__ import annotations

from transformers import CLIPTokenizer

MAX_LENGTH = 77


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            symbols.append(256 + extra)
            extra += 1
    return [chr(code) for code in symbols]


def byte_level_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with a 514-entry byte vocabulary and no merges."""
    vocab: dict[str, int] = {}
    symbols = _byte_symbols()
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_LENGTH)
