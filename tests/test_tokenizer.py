"""HFTokenizer and load_tokenizer's tokenizer.json branch (minillama4.tokenizer), which the CLI uses
for --checkpoint directories. A tiny byte-level BPE is trained with the `tokenizers` library on a
few sentences, with Llama 4 special tokens and a post-processor that puts <|begin_of_text|> in
front (as a real Llama tokenizer.json does), and saved in tmp_path; the library, reading the same
file, is the reference for every id, string and size."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from minillama4.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

SPECIALS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot|>", "<|finetune_right_pad|>"]
CORPUS = ["the cat sat on the mat", "the dog ate the cat food", "llama four is a mixture of experts model",
          "two plus two is four", "experts route tokens"] * 3
TEXTS = ["the cat ate the llama's food", "  two  spaces, a tab\tand\nnew lines\n",
         "unseen words: zebra quixotic", "2+2=4, café, naïve, 日本語, 🦙", ""]


def _trained() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    # a special token added after training: its id lies past the model's vocabulary
    tok.add_special_tokens(["<|image|>"])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    return tok


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint-like folder holding tokenizer.json (and a config.json, as a real one would)."""
    _trained().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text("{}")
    return tmp_path


def _reference(folder) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_load_tokenizer_picks_tokenizer_json_when_the_folder_has_one(checkpoint, tmp_path_factory):
    assert isinstance(load_tokenizer(checkpoint), HFTokenizer)
    assert isinstance(load_tokenizer(str(checkpoint)), HFTokenizer)  # a str path as the CLI passes it
    empty = tmp_path_factory.mktemp("no_tokenizer")
    (empty / "config.json").write_text("{}")
    assert isinstance(load_tokenizer(empty), ByteTokenizer)  # no tokenizer.json: the course's bytes
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def test_ids_are_the_libraries_ids(checkpoint):
    tok, ref = load_tokenizer(checkpoint), _reference(checkpoint)
    for text in TEXTS + ["<|eot|>the cat<|end_of_text|>"]:  # special-token strings in text become their ids
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, bos=True) == ref.encode(text, add_special_tokens=True).ids
    eot, eos = ref.token_to_id("<|eot|>"), ref.token_to_id("<|end_of_text|>")
    ids = tok.encode("<|eot|>the cat<|end_of_text|>")
    assert ids[0] == eot and ids[-1] == eos and len(ids) > 2
    # the trained merges are used: a corpus word is one token, not one per byte
    assert tok.encode("the") == [ref.token_to_id("the")]


def test_bos_adds_exactly_the_bos_id_in_front(checkpoint):
    tok = load_tokenizer(checkpoint)
    bos = _reference(checkpoint).token_to_id("<|begin_of_text|>")
    for text in TEXTS:
        plain, with_bos = tok.encode(text), tok.encode(text, bos=True)
        assert with_bos == [bos] + plain
        assert bos not in plain


def test_encode_decode_round_trip(checkpoint):
    tok, ref = load_tokenizer(checkpoint), _reference(checkpoint)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok.encode(text, bos=True)) == "<|begin_of_text|>" + text
        assert tok.decode(tok.encode(text, bos=True), skip_special=True) == text
    ids = tok.encode("<|eot|>the cat", bos=True)
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False) == "<|begin_of_text|><|eot|>the cat"
    assert tok.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True) == "the cat"
    # ids may come as a tensor or any ints (the CLI decodes out[0, n:].tolist(); int() accepts 0-d tensors)
    import torch

    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)


def test_vocab_size_counts_the_added_special_tokens(checkpoint):
    tok, ref = load_tokenizer(checkpoint), _reference(checkpoint)
    assert tok.vocab_size == ref.get_vocab_size(with_added_tokens=True) == len(ref.get_vocab(with_added_tokens=True))
    assert tok.vocab_size > ref.get_vocab_size(with_added_tokens=False)  # <|image|> was added after training
    image = ref.token_to_id("<|image|>")
    assert image == tok.vocab_size - 1  # every id the tokenizer can emit is < vocab_size (the embedding rows)
    assert tok.encode("<|image|>") == [image]
    every_id = {i for text in TEXTS for i in tok.encode(text, bos=True)}
    assert max(every_id) < tok.vocab_size


def test_token_strings_are_the_libraries_tokens(checkpoint):
    tok, ref = load_tokenizer(checkpoint), _reference(checkpoint)
    ids = tok.encode("<|eot|>the cat ate café", bos=True)
    strings = tok.token_strings(ids)
    assert strings == [ref.id_to_token(i) for i in ids] == ref.encode("<|eot|>the cat ate café").tokens
    assert strings[0] == "<|begin_of_text|>" and strings[1] == "<|eot|>"
    # an id outside the vocabulary gets a placeholder naming it, as ByteTokenizer.decode does
    assert tok.token_strings([tok.vocab_size, 10**6]) == [f"<|id_{tok.vocab_size}|>", "<|id_1000000|>"]


def test_hftokenizer_reads_a_file_path_directly(tmp_path):
    path = tmp_path / "tok.json"  # any name: HFTokenizer takes the file, load_tokenizer the folder
    _trained().save(str(path))
    for p in (path, str(path)):
        assert HFTokenizer(p).encode("the cat", bos=True) == Tokenizer.from_file(str(path)).encode("the cat").ids


@pytest.mark.parametrize("content", ["not json", "", "[1, 2]", "{}", '{"model": 3}'],
                         ids=["not-json", "empty", "list", "no-model", "model-not-an-object"])
def test_corrupt_tokenizer_json_fails_loudly(tmp_path, content):
    """A corrupt tokenizer.json stops the load (no fall back to the byte tokenizer, whose ids would
    be wrong for the checkpoint), naming the file and keeping the library's parse error."""
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a valid tokenizer\.json \(.*line 1 column"):
        load_tokenizer(tmp_path)


def test_bos_does_not_depend_on_the_files_post_processor(tmp_path):
    """Without a post-processor the library adds nothing for add_special_tokens=True; encode(bos=True)
    still puts <|begin_of_text|> first. A vocabulary without that token refuses bos=True."""
    tok = _trained()
    tok.post_processor = None
    tok.save(str(tmp_path / "tokenizer.json"))
    ours, ref = load_tokenizer(tmp_path), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert ref.encode("the cat", add_special_tokens=True).ids == ref.encode("the cat").ids == ours.encode("the cat")
    assert ours.encode("the cat", bos=True) == [ref.token_to_id("<|begin_of_text|>")] + ours.encode("the cat")
    plain = Tokenizer(models.WordLevel({"the": 0, "cat": 1, "<unk>": 2}, unk_token="<unk>"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    plain.save(str(tmp_path / "plain.json"))
    assert HFTokenizer(tmp_path / "plain.json").encode("the cat") == [0, 1]
    with pytest.raises(ValueError, match=r"no <\|begin_of_text\|> token; encode with bos=False"):
        HFTokenizer(tmp_path / "plain.json").encode("the cat", bos=True)


def test_load_tokenizer_takes_the_file_and_refuses_a_missing_folder(checkpoint, tmp_path):
    assert isinstance(load_tokenizer(checkpoint / "tokenizer.json"), HFTokenizer)
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder or a tokenizer.json file"):
        load_tokenizer(tmp_path / "not_here")  # was the byte tokenizer, silently


def test_special_ids_have_byte_tokenizers_names(checkpoint):
    """bos/eos/eot/pad/patch ids, as ByteTokenizer names them (code written for one runs on the other);
    a token this vocabulary lacks (<|patch|> here) is None."""
    tok, ref = load_tokenizer(checkpoint), _reference(checkpoint)
    names = {"bos_id": "<|begin_of_text|>", "eos_id": "<|end_of_text|>", "eot_id": "<|eot|>",
             "pad_id": "<|finetune_right_pad|>", "patch_id": "<|patch|>"}
    byte = ByteTokenizer()
    for attr, token in names.items():
        assert getattr(tok, attr) == ref.token_to_id(token)
        assert byte.decode([getattr(byte, attr)]) == token  # the same token under the same name
    assert tok.patch_id is None
    assert len({tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id}) == 4


def test_a_negative_id_is_refused_by_position_and_an_id_past_the_vocabulary_is_a_placeholder(checkpoint):
    """decode([-1]) raised bytearray's "byte must be in range(0, 256)" (the library's OverflowError for
    HFTokenizer), naming no id; ids >= vocab_size still print as <|id_N|>, in token_strings too."""
    byte, hf = ByteTokenizer(), load_tokenizer(checkpoint)
    for tok in (byte, hf):
        for call in (tok.decode, tok.token_strings):
            with pytest.raises(ValueError, match=r"ids\[1\]=-1: a token id must be a non-negative integer"):
                call([104, -1])
    assert byte.decode([104, 105, 300]) == "hi<|id_300|>"
    assert byte.token_strings([104, 200, 300]) == ["h", "<0xC8>", "<|id_300|>"]  # 300 was shown as "<0x12C>"
