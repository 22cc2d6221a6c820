"""Offline course corpora (English prose, Python code, arithmetic) and next-token batches.

Nothing is downloaded; every domain comes from this Python installation or a seeded generator:
  "prose"  docstrings of a fixed list of standard-library modules, their classes, functions and
           methods (each object's own __doc__, cleaned like inspect.getdoc), one document each;
           paragraphs with doctest examples (">>>") are dropped so the prose is mostly English
  "code"   the source of a fixed list of pure-Python standard-library modules, one document per
           top-level function or class, with docstrings and comments removed (an `ast` round
           trip) so the code domain holds little English
  "math"   seeded problems like "12+345=357\\n", twenty per document

    segments = mixed_corpus(seed=0, chars_per_domain=200_000)   # [Segment(domain, text), ...]
    corpus = tokenize_segments(segments)                        # ids [n] and a domain label [n]
    train_data, val_data = corpus.split(held_out=0.1)
    for x in random_batches(train_data.ids, batch=16, seq_len=128, generator=0): ...  # [b, t+1]

    # which domain does each expert prefer? windows of ids and labels cut at the same places:
    ids, labels = next(sequential_batches(val_data.ids, 8, 128, labels=val_data.domain))
    with RouterTrace(model) as trace:
        model(ids[:, :-1])
    trace.load(layer, mask=labels[:, :-1].flatten() == DOMAINS.index("code"))   # [e]

Simplifications and caveats: the prose and code depend on the Python version (patch releases
edit docstrings and source), so texts are deterministic for one installation (the same in a
script, a Jupyter kernel and pytest: tests/test_data.py checks it), not across installations; the
tokenizer is the course's byte-level one, so one token is one UTF-8 byte; an <|end_of_text|>
token closes every segment and carries that segment's domain label; the held-out split is the last
tokens of the shuffled stream (a document can straddle the cut).

Axes: n tokens of the stream, b batch, t tokens of a window.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import numbers
import random
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator, NamedTuple

import torch
from einops import rearrange

from .checks import check_int, check_type, is_int
from .tokenizer import ByteTokenizer

DOMAINS = ("prose", "code", "math")  # label i of a token = DOMAINS[i]

# Fixed and sorted: the corpus is a function of (Python installation, seed, size) only.
PROSE_MODULES = (
    "argparse", "ast", "base64", "builtins", "calendar", "collections", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "http.client", "inspect",
    "ipaddress", "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "shutil", "socket", "sqlite3", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "time", "typing", "unittest.case",
    "urllib.parse", "uuid", "zipfile",
)
# What other code adds to the stdlib's classes at run time is not prose of this Python: copy/pickle
# cache __slotnames__ (a list, whose type's docstring add() would take) on a class the first time one
# of its objects is copied (pytest copies an argparse.Namespace), and transformers patches
# logging.Logger with warning_once & co. Without skipping them the prose seen under pytest, or after
# importing transformers, differed from the one scripts and Jupyter kernels see.
RUNTIME_ATTRIBUTES = frozenset({"__slotnames__"})


def _from_stdlib(obj) -> bool:
    """False for a function or class that a non-stdlib package defined (and patched onto a class).
    Objects with no __module__ (instances of builtin types such as str or list) or one that names no
    loaded module (namedtuple's generated __new__: "namedtuple_<name>") count as the stdlib's."""
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str) or module not in sys.modules:
        return True
    return module.partition(".")[0] in sys.stdlib_module_names


CODE_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "difflib", "enum", "fractions", "functools", "glob",
    "gzip", "heapq", "inspect", "ipaddress", "json.decoder", "json.encoder", "logging", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "shutil", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing", "unittest.case",
    "urllib.parse", "uuid", "zipfile",
)


class Segment(NamedTuple):
    domain: str  # one of DOMAINS
    text: str  # one document (or the truncated last document of its domain)


# ------------------------------------------------------------------------------ the three domains
def _own_doc(obj) -> str | None:
    """obj's own docstring, cleaned like inspect.getdoc (which would also inherit one)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _without_doctests(doc: str) -> str:
    """Drop every paragraph (blank-line separated) that holds a doctest line."""
    paragraphs = doc.split("\n\n")
    return "\n\n".join(p for p in paragraphs if ">>>" not in p).strip()


@lru_cache(maxsize=None)
def prose_documents() -> tuple[str, ...]:
    """Docstrings of PROSE_MODULES: each module, then its own classes and functions by name, and
    each class's methods in definition order. Duplicates, docstrings under 40 characters (mostly
    "Return self==value."-style one-liners) and modules this Python cannot import are skipped."""
    docs, seen = [], set()

    def add(obj):
        doc = _own_doc(obj)
        doc = _without_doctests(doc) if doc else None
        if doc and len(doc) >= 40 and doc not in seen:
            seen.add(doc)
            docs.append(doc)

    for name in PROSE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. a Python built without sqlite3
            continue
        add(module)
        for member_name, obj in inspect.getmembers(module):  # sorted by name
            if getattr(obj, "__module__", None) != module.__name__:
                continue  # imported from elsewhere
            if name == "builtins" and member_name == "input":
                continue  # Jupyter kernels replace builtins.input: skip it so scripts and notebooks agree
            add(obj)
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():  # definition order
                    member = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                    if attr not in RUNTIME_ATTRIBUTES and _from_stdlib(member):
                        add(member)
    return tuple(docs)


class _StripDocstrings(ast.NodeTransformer):
    def visit(self, node):
        node = self.generic_visit(node)
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
        return node


@lru_cache(maxsize=None)
def code_documents() -> tuple[str, ...]:
    """Top-level functions and classes of CODE_MODULES, docstrings and comments removed
    (ast.parse -> strip docstrings -> ast.unparse). Modules without source files are skipped."""
    docs = []
    for name in CODE_MODULES:
        try:
            source = inspect.getsource(importlib.import_module(name))
        except (ImportError, OSError, TypeError):  # a module this build lacks, or no .py files
            continue
        tree = _StripDocstrings().visit(ast.parse(source))
        docs.extend(ast.unparse(node) for node in tree.body
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))
    return tuple(docs)


ARITHMETIC_OPS = "+-*"  # the operators arithmetic_problem knows


def _check_arithmetic(max_digits: int, ops: str) -> None:
    check_int("max_digits", max_digits, 1)
    # an unknown operator used to fail (KeyError) only once it was drawn, possibly deep into a corpus
    if not isinstance(ops, str) or not ops or not set(ops) <= set(ARITHMETIC_OPS):
        raise ValueError(f"ops={ops!r}: expected a non-empty string of operators from {ARITHMETIC_OPS!r}, e.g. \"+-\"")


def arithmetic_problem(rng: random.Random, max_digits: int = 3, ops: str = "+") -> tuple[str, str]:
    """One problem as (prompt, answer), e.g. ("12+345=", "357"). Each operand has 1..max_digits
    digits (the digit count is drawn first, so short numbers are as common as long ones);
    "-" keeps the result non-negative by putting the larger operand first."""
    check_type("rng", rng, random.Random, "e.g. random.Random(0)")
    _check_arithmetic(max_digits, ops)
    a, b = (rng.randrange(10 ** (d - 1) if d > 1 else 0, 10 ** d)
            for d in (rng.randint(1, max_digits), rng.randint(1, max_digits)))
    op = rng.choice(ops)
    if op == "-":
        a, b = max(a, b), min(a, b)
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a}{op}{b}=", str(result)


def arithmetic_documents(n_chars: int, seed: int = 0, max_digits: int = 3, ops: str = "+",
                         per_document: int = 20) -> list[str]:
    """Documents of `per_document` problems, one "a+b=c\\n" per line, until n_chars characters."""
    check_int("n_chars", n_chars, 0)
    check_int("per_document", per_document, 1)  # 0: empty documents, and the loop never ended
    _check_arithmetic(max_digits, ops)
    rng, docs, total = random.Random(seed), [], 0
    while total < n_chars:
        doc = "".join(p + a + "\n" for p, a in (arithmetic_problem(rng, max_digits, ops)
                                                 for _ in range(per_document)))
        docs.append(doc)
        total += len(doc)
    return docs


# ------------------------------------------------------------------------------ the mixed corpus
def _take(documents, n_chars: int, rng: random.Random) -> list[str]:
    """Documents in a seeded random order until n_chars characters (the last one truncated)."""
    order = list(range(len(documents)))
    rng.shuffle(order)
    out, total = [], 0
    for i in order:
        if total >= n_chars:
            break
        doc = documents[i][: n_chars - total]
        out.append(doc)
        total += len(doc)
    return out


def mixed_corpus(seed: int = 0, chars_per_domain: int = 200_000, domains: tuple[str, ...] = DOMAINS,
                 max_digits: int = 3) -> list[Segment]:
    """Segments of every domain in `domains`, chars_per_domain characters each (less if the stdlib
    holds less), shuffled together with `seed`; arithmetic operands have up to max_digits digits.
    Deterministic for one Python installation."""
    check_int("chars_per_domain", chars_per_domain, 1)  # <= 0 gave an empty corpus, a float a slice TypeError
    if isinstance(domains, str) or not isinstance(domains, (tuple, list)) or not domains:
        raise ValueError(f"domains={domains!r}: expected a non-empty tuple of names from {DOMAINS}, e.g. (\"prose\",)")
    for domain in domains:
        if domain not in DOMAINS:
            raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")
    if len(set(domains)) < len(domains):  # a repeated domain doubled its share
        raise ValueError(f"domains={tuple(domains)!r}: each domain at most once")
    check_int("max_digits", max_digits, 1)
    rng = random.Random(seed)
    segments = []
    for domain in domains:
        if domain == "prose":
            docs = _take(prose_documents(), chars_per_domain, rng)
        elif domain == "code":
            docs = _take(code_documents(), chars_per_domain, rng)
        else:  # "math"
            docs = _take(arithmetic_documents(chars_per_domain, rng.randrange(2**32), max_digits),
                         chars_per_domain, rng)
        segments.extend(Segment(domain, d) for d in docs if d)
    rng.shuffle(segments)
    return segments


@dataclass
class TokenCorpus:
    """A token stream with one domain label per token."""

    ids: torch.Tensor  # [n] token ids (int64)
    domain: torch.Tensor  # [n] index into `domains` of the segment each token came from
    domains: tuple[str, ...] = DOMAINS  # label names

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, held_out: float = 0.1) -> tuple["TokenCorpus", "TokenCorpus"]:
        """(train, validation): the last `held_out` fraction of the stream is validation; both
        parts must hold at least one token."""
        if isinstance(held_out, bool) or not isinstance(held_out, numbers.Real):
            raise TypeError(f"held_out={held_out!r}: must be a number in (0, 1)")
        if not 0 < held_out < 1:
            raise ValueError(f"held_out={held_out} must be in (0, 1)")
        cut = len(self.ids) - int(len(self.ids) * held_out)
        if cut == 0 or cut == len(self.ids):  # an empty validation set evaluated to nothing
            raise ValueError(f"held_out={held_out} of {len(self.ids)} tokens gives {cut} training and "
                             f"{len(self.ids) - cut} validation tokens: each part needs at least one "
                             "(a larger corpus or held_out)")
        return (TokenCorpus(self.ids[:cut], self.domain[:cut], self.domains),
                TokenCorpus(self.ids[cut:], self.domain[cut:], self.domains))

    def domain_fractions(self) -> dict[str, float]:
        """Fraction of tokens from each domain."""
        counts = torch.bincount(self.domain, minlength=len(self.domains)).float()
        return {d: float(c) for d, c in zip(self.domains, counts / counts.sum())}


def tokenize_segments(segments: list[Segment], tokenizer: ByteTokenizer | None = None) -> TokenCorpus:
    """Encode every segment followed by <|end_of_text|>; label each token with its segment's domain.
    Special-token strings inside the text are encoded as plain bytes, never as special ids."""
    if isinstance(segments, (str, bytes)) or not hasattr(segments, "__iter__"):
        raise TypeError(f"segments must be a list of Segment, got {type(segments).__name__}; e.g. from mixed_corpus")
    segments = list(segments)  # a generator: read once, here
    for i, seg in enumerate(segments):  # all checked before any is encoded
        check_type(f"segments[{i}]", seg, Segment, "Segment(domain, text), e.g. from mixed_corpus")
        if seg.domain not in DOMAINS:
            raise ValueError(f"segments[{i}].domain={seg.domain!r}: expected one of {DOMAINS}")
        check_type(f"segments[{i}].text", seg.text, str)
    tok = tokenizer or ByteTokenizer()
    ids, labels = [], []
    for seg in segments:
        piece = list(seg.text.encode("utf-8")) + [tok.eos_id]
        ids.extend(piece)
        labels.extend([DOMAINS.index(seg.domain)] * len(piece))
    return TokenCorpus(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


def load_corpus(seed: int = 0, chars_per_domain: int = 200_000,
                held_out: float = 0.1) -> tuple[TokenCorpus, TokenCorpus]:
    """mixed_corpus -> tokenize_segments -> split, in one call: (train, validation)."""
    return tokenize_segments(mixed_corpus(seed, chars_per_domain)).split(held_out)


# ------------------------------------------------------------------------------ batches
def _as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if generator is not None and not is_int(generator):  # int(0.7) used to seed 0 silently
        raise TypeError(f"generator={generator!r}: expected None, an int seed or a torch.Generator")
    return torch.Generator().manual_seed(0 if generator is None else int(generator))


def _check_windows(ids, batch: int, seq_len: int, labels) -> None:
    check_type("ids", ids, torch.Tensor, "a 1-D tensor of token ids")
    if ids.dim() != 1:
        raise ValueError(f"ids has shape {tuple(ids.shape)}: expected a 1-D token stream [n]")
    check_int("batch", batch, 1)  # 0 or less used to yield empty (or fail as a "negative dimension")
    check_int("seq_len", seq_len, 1)  # 0 used to yield windows of one token: no next-token target
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != ids.shape):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels {shape}: expected a tensor of the ids' shape {tuple(ids.shape)}")


def random_batches(ids: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator | int | None = None,
                   labels: torch.Tensor | None = None) -> Iterator:
    """Endless batches of windows [b, t+1] at uniformly random start positions (inputs are
    window[:, :-1], next-token targets window[:, 1:]). `generator` is a torch.Generator or a
    seed. With `labels` [n], yields (ids window, labels window) cut at the same positions.
    The arguments are checked at the call, before the first batch is drawn."""
    _check_windows(ids, batch, seq_len, labels)
    if len(ids) < seq_len + 1:
        raise ValueError(f"{len(ids)} tokens are too few for windows of seq_len + 1 = {seq_len + 1}")
    return _random_windows(ids, batch, seq_len, _as_generator(generator), labels)


def _random_windows(ids, batch, seq_len, gen, labels) -> Iterator:
    offsets = torch.arange(seq_len + 1)
    while True:
        starts = torch.randint(0, len(ids) - seq_len, (batch,), generator=gen)
        index = rearrange(starts, "b -> b 1") + rearrange(offsets, "t -> 1 t")  # [b, t+1]
        yield ids[index] if labels is None else (ids[index], labels[index])


def sequential_batches(ids: torch.Tensor, batch: int, seq_len: int, labels: torch.Tensor | None = None,
                       max_batches: int | None = None) -> Iterator:
    """Non-overlapping windows [b, t+1] in stream order (for evaluation); the last batch may be
    smaller and the tail shorter than one window is left out. Windows share their edge token
    (window j ends where window j+1 starts) so every token but the first is a target once.
    The arguments are checked at the call, before the first batch."""
    _check_windows(ids, batch, seq_len, labels)
    if max_batches is not None:
        check_int("max_batches", max_batches, 1)  # 0 yielded nothing, which evaluate read as a loss of 0.0
    n_windows = (len(ids) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"{len(ids)} tokens are too few for one window of seq_len + 1 = {seq_len + 1}")
    return _sequential_windows(ids, batch, seq_len, n_windows, labels, max_batches)


def _sequential_windows(ids, batch, seq_len, n_windows, labels, max_batches) -> Iterator:
    offsets = torch.arange(seq_len + 1)
    for i, first in enumerate(range(0, n_windows, batch)):
        if max_batches is not None and i >= max_batches:
            return
        starts = torch.arange(first, min(first + batch, n_windows)) * seq_len
        index = rearrange(starts, "b -> b 1") + rearrange(offsets, "t -> 1 t")  # [b, t+1]
        yield ids[index] if labels is None else (ids[index], labels[index])
