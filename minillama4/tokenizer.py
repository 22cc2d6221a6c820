"""A byte-level tokenizer with the Llama 4 special tokens, for the course's small models.

Real Llama 4 uses a 200,000-rank tiktoken BPE whose file is under Meta's licence; the course
models are trained from scratch, so bytes are enough: ids 0..255 are the UTF-8 bytes and the
Llama 4 special tokens follow from 256 on (same names, compact ids). `HFTokenizer` wraps a real
checkpoint's tokenizer.json when the optional `tokenizers` package is installed.
"""

from __future__ import annotations

import re
from pathlib import Path

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|header_start|>", "<|header_end|>", "<|eom|>",
    "<|eot|>", "<|step|>", "<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>",
    "<|image_start|>", "<|image_end|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
    "<|image|>", "<|patch|>",
]
_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")


def _token_ids(ids) -> list[int]:
    """ids (ints, or a tensor: int() takes its 0-d elements) -> a list of ints, a negative id refused
    by position: bytearray and the tokenizers library would fail on it without naming the id."""
    out = [int(i) for i in ids]
    for n, i in enumerate(out):
        if i < 0:
            raise ValueError(f"ids[{n}]={i}: a token id must be a non-negative integer")
    return out


class ByteTokenizer:
    """UTF-8 bytes plus the Llama 4 special tokens. vocab_size = 256 + 16 = 272."""

    def __init__(self):
        self.special = {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)}
        self.id_to_special = {i: s for s, i in self.special.items()}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self.bos_id = self.special["<|begin_of_text|>"]
        self.eos_id = self.special["<|end_of_text|>"]
        self.eot_id = self.special["<|eot|>"]
        self.pad_id = self.special["<|finetune_right_pad|>"]
        self.patch_id = self.special["<|patch|>"]

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Special-token strings in `text` become their ids; everything else becomes bytes."""
        ids = [self.bos_id] if bos else []
        for piece in _SPLIT.split(text):
            ids.extend([self.special[piece]] if piece in self.special else piece.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        out, buf = [], bytearray()
        for i in _token_ids(ids):  # an id >= vocab_size is printed as a placeholder, <|id_N|>
            if i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            if not skip_special:
                out.append(self.id_to_special.get(i, f"<|id_{i}|>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_strings(self, ids) -> list[str]:
        """One printable string per id (for routing tables)."""
        return [self.id_to_special.get(i) or (repr(chr(i))[1:-1] if i < 128 else f"<0x{i:02X}>" if i < 256
                                              else f"<|id_{i}|>")  # outside the vocabulary: as decode does
                for i in _token_ids(ids)]


class HFTokenizer:
    """A real checkpoint's tokenizer.json through the optional `tokenizers` package."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading tokenizer.json needs `pip install tokenizers`") from e
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer.json")
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception with the parse error only
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        # the special ids ByteTokenizer has, by the same names; each is None if this vocabulary lacks it
        self.bos_id = self.tok.token_to_id("<|begin_of_text|>")
        self.eos_id = self.tok.token_to_id("<|end_of_text|>")
        self.eot_id = self.tok.token_to_id("<|eot|>")
        self.pad_id = self.tok.token_to_id("<|finetune_right_pad|>")
        self.patch_id = self.tok.token_to_id("<|patch|>")

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Token ids of `text`; bos=True puts <|begin_of_text|> first (itself, not through the file's
        post-processor, which may add nothing or other tokens too)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if not bos:
            return ids
        if self.bos_id is None:
            raise ValueError("this tokenizer.json has no <|begin_of_text|> token; encode with bos=False")
        return [self.bos_id] + ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tok.decode(_token_ids(ids), skip_special_tokens=skip_special)

    def token_strings(self, ids) -> list[str]:
        return [self.tok.id_to_token(i) or f"<|id_{i}|>" for i in _token_ids(ids)]


def load_tokenizer(checkpoint_dir: str | Path | None = None):
    """tokenizer.json of a checkpoint folder if it has one (or that file itself), else the course's
    byte tokenizer (None, or a folder without one: the checkpoints this course saves)."""
    if checkpoint_dir is None:
        return ByteTokenizer()
    path = Path(checkpoint_dir)
    if path.is_file() and path.suffix == ".json":
        return HFTokenizer(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a checkpoint folder or a tokenizer.json file")
    if (path / "tokenizer.json").exists():
        return HFTokenizer(path / "tokenizer.json")
    return ByteTokenizer()
