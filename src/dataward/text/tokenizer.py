"""A local CLIP tokenizer: transformers' own ``CLIPTokenizer`` read from a small byte-level BPE vocabulary written here,
in CLIP's ``vocab.json`` / ``merges.txt`` format, with no network.

The vocabulary is laid out like CLIP's: the 256 byte symbols (GPT-2's byte-to-unicode map), the same with the end-of-word
suffix ``</w>``, one token per merge in merge order, then ``<|startoftext|>`` and ``<|endoftext|>``. The merges are learnt
from a word list (:func:`learn_merges`: the most frequent adjacent pair first, ties by the pair's text) until every word
is one token, so captions of the grammar in :mod:`dataward.captions` are one token a word, and any other text still
tokenizes, byte by byte (the byte symbols are all in the vocabulary). Same words, same bytes, every time.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

from transformers import CLIPTokenizer

from dataward.captions import caption_words
from dataward.errors import DatawardError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MAX_LENGTH = 32  # tokens per prompt, with BOS and EOS (CLIP's is 77); the text encoder's positions must cover it
MERGES_HEADER = "#version: 0.2"  # the first line of CLIP's merges.txt (the reader skips it)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's (and CLIP's) map of the 256 bytes to printable characters, in CLIP's vocabulary order: the printable
    Latin-1 bytes (mapped to themselves) first, then the others (mapped to 256, 257, ...)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(others)}


def _symbols(word: str) -> tuple[str, ...]:
    """A word as byte symbols, the last one carrying the end-of-word suffix (how CLIP's BPE starts every word)."""
    table = bytes_to_unicode()
    chars = [table[b] for b in word.encode("utf-8")]
    return (*chars[:-1], chars[-1] + END_OF_WORD)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """BPE merges that make every word of ``words`` one token: repeatedly the most frequent adjacent pair over the
    distinct words (ties broken by the pair's text, so the result depends on the set of words only)."""
    pieces = [_symbols(word) for word in sorted(set(words)) if word]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for word in pieces for pair in zip(word, word[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        pieces = [_merge(word, best) for word in pieces]


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_vocabulary(folder: str | Path, words: Iterable[str] | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP's format) for ``words`` (default: the caption grammar's) into
    ``folder``; returns it. The bytes depend only on the set of words."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(caption_words() if words is None else words)
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join([MERGES_HEADER, *(" ".join(pair) for pair in merges)]) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(folder: str | Path, words: Iterable[str] | None = None, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` read from the vocabulary :func:`write_vocabulary` writes into ``folder`` (no network)."""
    folder = write_vocabulary(folder, words)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length, local_files_only=True)
    if tokenizer.bos_token_id is None or tokenizer.convert_tokens_to_ids(BOS) != len(tokenizer) - 2:
        raise DatawardError(f"the tokenizer read from {folder} does not have CLIP's special tokens at the end of its vocabulary")
    return tokenizer
