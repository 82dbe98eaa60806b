"""The worker side of preprocessing: parse a chunk's records and tokenize them with the Rust batch encoder."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from data_prep.sources import Chunk, checked_records
from megatron_bloom.data.tokenizer import load_tokenizer


@dataclass(frozen=True)
class EncoderSettings:
    tokenizer: str
    text_key: str
    lang_key: Optional[str]  # set only with --split-by-lang
    eod_id: Optional[int]  # appended to every document with --append-eod
    dtype: str


@dataclass
class EncodedChunk:
    tokens: np.ndarray  # the chunk's documents back to back
    lengths: np.ndarray  # tokens per document
    languages: Optional[List[str]]
    skipped: List[Tuple[str, str]]  # (reason, "file:line") in input order


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    # One process = one thread: --workers sets the parallelism, and rayon threads on top would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return load_tokenizer(path)


def encode_chunk(chunk: Chunk, settings: EncoderSettings) -> EncodedChunk:
    texts, languages, skipped = [], [], []
    for where, text, language, reason in checked_records(chunk, settings.text_key, settings.lang_key):
        if reason:
            skipped.append((reason, where))
        else:
            texts.append(text)
            languages.append(language)
    return encode_texts(texts, languages, skipped, settings)


def encode_texts(texts: List[str], languages: List[Optional[str]], skipped: List[Tuple[str, str]],
                 settings: EncoderSettings) -> EncodedChunk:
    """Tokenize checked documents (in order) into one chunk of tokens; `skipped` travels with them."""
    tokenizer = _tokenizer(settings.tokenizer)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encodings = encode(texts, add_special_tokens=False)
    lengths = np.fromiter((len(encoding) for encoding in encodings), dtype=np.int64, count=len(encodings))
    extra = 1 if settings.eod_id is not None else 0
    tokens = np.empty(int(lengths.sum()) + extra * len(encodings), dtype=settings.dtype)
    position = 0
    for encoding, length in zip(encodings, lengths.tolist()):
        tokens[position: position + length] = encoding.ids
        position += length
        if extra:
            tokens[position] = settings.eod_id
            position += 1
    return EncodedChunk(tokens=tokens, lengths=(lengths + extra).astype(np.int32),
                        languages=list(languages) if settings.lang_key else None, skipped=skipped)


def split_by_language(chunk: EncodedChunk) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The chunk's documents grouped by language, keeping their order within each language."""
    ends = np.cumsum(chunk.lengths, dtype=np.int64)
    starts = ends - chunk.lengths
    groups: Dict[str, List[int]] = {}
    for index, language in enumerate(chunk.languages):
        groups.setdefault(language, []).append(index)
    result = {}
    for language, indices in groups.items():
        pieces = [chunk.tokens[starts[i]: ends[i]] for i in indices]
        result[language] = (np.concatenate(pieces), chunk.lengths[indices])
    return result
