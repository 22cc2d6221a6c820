"""Offline corpora and batches (minillama4.data). The stdlib texts change between Python
releases, so these tests check properties (non-empty, mostly ASCII, deterministic), not text."""

import ast
import random

import pytest
import torch

from minillama4 import ByteTokenizer
from minillama4.data import (DOMAINS, arithmetic_documents, arithmetic_problem, code_documents, load_corpus,
                             mixed_corpus, prose_documents, random_batches, sequential_batches, tokenize_segments)


def ascii_fraction(texts) -> float:
    text = "".join(texts)
    return sum(c < "\x80" for c in text) / len(text)


def test_prose_is_english_docstrings_without_doctests():
    docs = prose_documents()
    assert len(docs) > 500 and sum(map(len, docs)) > 200_000
    assert ascii_fraction(docs) > 0.99
    assert not any(">>>" in d for d in docs)
    assert len(set(docs)) == len(docs)
    assert sum(" the " in d for d in docs) > len(docs) / 3  # English, not code
    assert prose_documents.__wrapped__() == docs  # recomputing gives the same texts, same order


def test_code_is_python_without_docstrings():
    docs = code_documents()
    assert len(docs) > 300 and sum(map(len, docs)) > 200_000
    assert ascii_fraction(docs) > 0.99
    for doc in docs[:: max(1, len(docs) // 25)]:
        node = ast.parse(doc).body[0]
        assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        assert ast.get_docstring(node) is None
    assert code_documents.__wrapped__() == docs


def test_arithmetic_is_correct_and_seeded():
    rng = random.Random(0)
    for _ in range(200):
        prompt, answer = arithmetic_problem(rng, max_digits=3, ops="+-*")
        assert prompt.endswith("=") and eval(prompt[:-1]) == int(answer) >= 0
    docs = arithmetic_documents(2_000, seed=3)
    assert docs == arithmetic_documents(2_000, seed=3) and docs != arithmetic_documents(2_000, seed=4)
    lines = "".join(docs).splitlines()
    assert sum(map(len, docs)) >= 2_000 and all(eval(line.replace("=", "==")) for line in lines)
    assert max(len(line.split("+")[0]) for line in lines) == 3  # up to three digits


def test_mixed_corpus_is_deterministic_and_balanced():
    segments = mixed_corpus(seed=0, chars_per_domain=20_000)
    assert segments == mixed_corpus(seed=0, chars_per_domain=20_000)
    assert segments != mixed_corpus(seed=1, chars_per_domain=20_000)
    for domain in DOMAINS:
        assert sum(len(s.text) for s in segments if s.domain == domain) == 20_000
    assert {s.domain for s in segments[:30]} == set(DOMAINS)  # shuffled together, not in blocks
    only = mixed_corpus(seed=0, chars_per_domain=1_000, domains=("math",))
    assert {s.domain for s in only} == {"math"}
    with pytest.raises(ValueError, match="unknown domain"):
        mixed_corpus(domains=("poetry",))


def test_the_corpus_under_pytest_is_the_one_scripts_and_notebooks_see():
    """Same Python, same texts: a fresh interpreter (as a script or a Jupyter kernel runs) and this
    pytest process build identical prose and code, though here an argparse.Namespace has been copied
    (that leaves a __slotnames__ list on the class) and transformers has patched logging.Logger with
    warning_once & co. Before data.RUNTIME_ATTRIBUTES and data._from_stdlib they did not, so the
    learning thresholds of the tests were tuned on a corpus no notebook trained on."""
    import argparse
    import copy
    import hashlib
    import logging
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")  # a dev dependency: always there under make test
    transformers.logging.get_logger("probe")  # imports its logging module, which patches the class
    copy.copy(argparse.Namespace(a=1))  # what pytest's option handling does
    assert "__slotnames__" in vars(argparse.Namespace) and "warning_once" in vars(logging.Logger)
    prose_documents.cache_clear()
    here = hashlib.sha256(repr((prose_documents(), code_documents())).encode()).hexdigest()
    script = ("import hashlib; from minillama4.data import prose_documents, code_documents; "
              "print(hashlib.sha256(repr((prose_documents(), code_documents())).encode()).hexdigest())")
    fresh = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert fresh.stdout.strip() == here


def test_tokenize_labels_every_token():
    segments = mixed_corpus(seed=0, chars_per_domain=5_000)
    corpus = tokenize_segments(segments)
    tok = ByteTokenizer()
    assert corpus.ids.dtype == torch.long and corpus.ids.shape == corpus.domain.shape
    assert int(corpus.ids.max()) < tok.vocab_size
    assert int((corpus.ids == tok.eos_id).sum()) == len(segments)  # one <|end_of_text|> per segment
    math_text = tok.decode(corpus.ids[corpus.domain == DOMAINS.index("math")], skip_special=True)
    assert set(math_text) <= set("0123456789+=\n")
    code_text = tok.decode(corpus.ids[corpus.domain == DOMAINS.index("code")])
    assert "def " in code_text or "class " in code_text
    fractions = corpus.domain_fractions()
    assert set(fractions) == set(DOMAINS) and all(0.3 < f < 0.37 for f in fractions.values())


def test_split_keeps_the_stream():
    train, val = load_corpus(seed=0, chars_per_domain=5_000, held_out=0.2)
    whole = tokenize_segments(mixed_corpus(seed=0, chars_per_domain=5_000))
    assert torch.equal(torch.cat([train.ids, val.ids]), whole.ids)
    assert torch.equal(torch.cat([train.domain, val.domain]), whole.domain)
    assert len(val) == int(len(whole) * 0.2)
    with pytest.raises(ValueError, match=r"held_out=1.5 must be in \(0, 1\)"):
        whole.split(held_out=1.5)


def test_random_batches_are_seeded_windows():
    ids = torch.arange(1000)
    labels = ids % 7
    first = next(random_batches(ids, batch=4, seq_len=16, generator=5))
    assert first.shape == (4, 17)
    assert torch.equal(first, next(random_batches(ids, 4, 16, torch.Generator().manual_seed(5))))
    assert not torch.equal(first, next(random_batches(ids, 4, 16, generator=6)))
    assert torch.equal(first - first[:, :1], torch.arange(17).expand(4, 17))  # contiguous slices
    windows, window_labels = next(random_batches(ids, 4, 16, generator=5, labels=labels))
    assert torch.equal(windows, first) and torch.equal(window_labels, first % 7)
    batches = random_batches(ids, 4, 16, generator=5)
    assert not torch.equal(next(batches), next(batches))  # a stream, not one batch repeated
    assert torch.equal(next(random_batches(torch.arange(17), 2, 16)), torch.arange(17).expand(2, 17))  # one fits
    with pytest.raises(ValueError, match="too few"):
        next(random_batches(torch.arange(16), 2, 16))


def test_sequential_batches_cover_the_stream_in_order():
    ids = torch.arange(100)
    batches = list(sequential_batches(ids, batch=4, seq_len=10))
    assert [b.shape for b in batches] == [(4, 11), (4, 11), (1, 11)]  # 9 windows of 10 targets
    windows = torch.cat(batches)
    assert torch.equal(windows[:, 0], torch.arange(0, 90, 10))
    assert torch.equal(windows[:-1, -1], windows[1:, 0])  # windows share their edge token
    assert len(list(sequential_batches(ids, 4, 10, max_batches=2))) == 2
    ids_w, labels_w = next(sequential_batches(ids, 2, 10, labels=ids * 2))
    assert torch.equal(labels_w, ids_w * 2)


def test_module_lists_are_sorted():
    from minillama4.data import CODE_MODULES, PROSE_MODULES

    assert list(PROSE_MODULES) == sorted(PROSE_MODULES) and list(CODE_MODULES) == sorted(CODE_MODULES)


def test_bad_batch_and_arithmetic_arguments_are_refused_at_the_call():
    ids = torch.arange(100)
    for call, match in [(lambda: random_batches(ids, 0, 10), "batch=0: must be a positive integer"),
                        (lambda: random_batches(ids, 2, -1), "seq_len=-1: must be a positive integer"),
                        (lambda: random_batches(ids[None], 2, 10), "ids has shape \\(1, 100\\)"),
                        (lambda: random_batches(ids, 2, 10, labels=ids[:5]), "labels \\(5,\\)"),
                        (lambda: sequential_batches(ids, 2, 10, max_batches=0), "max_batches=0"),
                        (lambda: sequential_batches(ids[:5], 2, 10), "5 tokens are too few"),
                        (lambda: arithmetic_documents(100, per_document=0), "per_document=0"),
                        (lambda: arithmetic_documents(100, max_digits=0), "max_digits=0"),
                        (lambda: arithmetic_problem(random.Random(0), ops="/"), "ops='/': .*'\\+-\\*'"),
                        (lambda: arithmetic_problem(random.Random(0), ops=""), "ops=''")]:
        with pytest.raises(ValueError, match=match):
            call()  # raised by the call itself, not at the first next()
    with pytest.raises(TypeError, match="rng must be a Random"):
        arithmetic_problem(0)


def test_corpus_arguments_are_refused_before_any_work():
    from minillama4.data import Segment, TokenCorpus

    for chars, error in [(-5, ValueError), (0, ValueError), (100.5, TypeError)]:  # -5 gave [] silently
        with pytest.raises(error, match=f"chars_per_domain={chars}: must be a positive integer"):
            mixed_corpus(chars_per_domain=chars, domains=("prose",))
    with pytest.raises(ValueError, match=r"domains='prose': expected a non-empty tuple of names from "
                                         r"\('prose', 'code', 'math'\)"):
        mixed_corpus(chars_per_domain=100, domains="prose")
    with pytest.raises(ValueError, match=r"domains=\(\): expected a non-empty tuple"):
        mixed_corpus(chars_per_domain=100, domains=())
    with pytest.raises(ValueError, match=r"domains=\('math', 'math'\): each domain at most once"):
        mixed_corpus(chars_per_domain=100, domains=("math", "math"))
    with pytest.raises(ValueError, match="max_digits=0: must be a positive integer"):
        mixed_corpus(chars_per_domain=100, domains=("prose",), max_digits=0)
    with pytest.raises(TypeError, match="segments\\[0\\] must be a Segment, got str"):
        tokenize_segments(["hello"])  # used to fail with AttributeError
    with pytest.raises(ValueError, match=r"segments\[1\].domain='poetry': expected one of \('prose', 'code', 'math'\)"):
        tokenize_segments([Segment("prose", "x"), Segment("poetry", "x")])  # was "tuple.index(x): x not in tuple"
    with pytest.raises(TypeError, match="segments must be a list of Segment, got str"):
        tokenize_segments("hello")
    corpus = TokenCorpus(torch.arange(5), torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="held_out='0.1': must be a number in \\(0, 1\\)"):
        corpus.split("0.1")
    with pytest.raises(ValueError, match="held_out=0.1 of 5 tokens gives 5 training and 0 validation tokens: "
                                         "each part needs at least one"):
        corpus.split(0.1)  # used to return an empty validation set
    assert [len(part) for part in corpus.split(0.2)] == [4, 1]
    with pytest.raises(ValueError, match="held_out=nan must be in \\(0, 1\\)"):
        corpus.split(float("nan"))
    for generator in (0.7, "a", True):  # 0.7 seeded 0 silently
        with pytest.raises(TypeError, match=f"generator={generator!r}: expected None, an int seed or a torch.Generator"):
            random_batches(torch.arange(100), 2, 8, generator=generator)
    assert torch.equal(next(random_batches(torch.arange(100), 2, 8)), next(random_batches(torch.arange(100), 2, 8, 0)))
