"""CLIP-format byte-level BPE vocabularies built offline.

Stable Diffusion 1.x/2.x text encoders use the OpenAI CLIP BPE; rebuilding its
``vocab.json``/``merges.txt`` from ``bpe_simple_vocab_16e6.txt.gz`` lets us
tokenize exactly like the released checkpoints without downloading anything,
and the same format gives tiny tokenizers for fast test models.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from transformers import CLIPTokenizer

EOW = "</w>"
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
CLIP_NUM_MERGES = 48894  # 49408 - 512 base tokens - 2 special tokens

Vocab = tuple[dict[str, int], list[tuple[str, str]]]


def bytes_to_unicode() -> dict[int, str]:
    """Printable stand-ins for the 256 byte values, in CLIP's id order.

    Byte-level BPE needs every byte to be a visible, non-space character; the
    printable Latin-1 bytes stand for themselves and the rest are shifted
    past 255, which fixes the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}


def _assemble(merges: list[tuple[str, str]]) -> Vocab:
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + EOW for c in chars] + ["".join(pair) for pair in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_vocab_from_bpe(bpe_path: str | Path) -> Vocab:
    """The exact CLIP vocabulary; CLIP only uses the first 48894 merges of the file."""
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : CLIP_NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    return _assemble(merges)


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges lowest rank first, as the tokenizer does."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def word_vocab(words: Sequence[str]) -> Vocab:
    """A tiny CLIP-format vocabulary in which every given word is one token.

    Test models need a realistic tokenizer but a small embedding table; each
    merge is appended after all earlier ones, so a later word can never change
    how an earlier word is split.
    """
    byte_char = bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not (word.isalpha() and word.islower()):
            raise ValueError(f"word_vocab needs lowercase letter-only words, got {word!r}")
        symbols = [byte_char[b] for b in word.encode("utf-8")]
        symbols[-1] += EOW
        while len(pieces := _bpe(symbols, ranks)) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return _assemble(merges)


def build_clip_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int = 77
) -> CLIPTokenizer:
    """Load through vocab/merges files because that constructor path is stable across transformers 4.4x and 5.x."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(" ".join(pair) for pair in merges)]
        (root / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


def build_t5_tokenizer(words: Sequence[str], model_max_length: int = 512):
    """A T5 (Unigram) tokenizer in which every given word is one token ("▁word"), built in code: the
    special tokens where T5 has them (<pad> 0, </s> 1, <unk> 2), no sentinel tokens. Saved and loaded back
    through a folder, like the CLIP one, so it is what `from_pretrained` gives."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((f"\u2581{w}", -1.0) for w in words), ("\u2581", -2.0)]
    with tempfile.TemporaryDirectory() as folder:
        T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length).save_pretrained(folder)
        return T5Tokenizer.from_pretrained(folder)
