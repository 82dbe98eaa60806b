"""Loading a `tokenizers` tokenizer from a `tokenizer.json` file or a directory holding one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer

from megatron_bloom.errors import UserError


def tokenizer_file(path: str | Path) -> Path:
    path = Path(path)
    candidate = path / "tokenizer.json" if path.is_dir() else path
    if not candidate.is_file():
        raise UserError(f"tokenizer {path} not found: give a tokenizer.json file or a directory holding one.")
    return candidate


def load_tokenizer(path: str | Path) -> Tokenizer:
    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as error:  # the Rust side raises a bare Exception for a malformed file
        raise UserError(f"cannot load tokenizer {file}: {error}.") from None


def vocabulary_difference(tokenizer: Tokenizer, other: Tokenizer) -> Optional[str]:
    """None when both map the same tokens to the same ids (added tokens included), else how they differ."""
    vocabulary, others = tokenizer.get_vocab(with_added_tokens=True), other.get_vocab(with_added_tokens=True)
    if vocabulary == others:
        return None
    differ = sorted(token for token in vocabulary.keys() | others.keys() if vocabulary.get(token) != others.get(token))
    return (f"{len(vocabulary)} against {len(others)} tokens, {len(differ)} of them absent from one or with "
            f"another id (e.g. {', '.join(repr(token) for token in differ[:3])})")
