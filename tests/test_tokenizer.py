"""Tokenizer parity with transformers 5.x's LlamaTokenizer on the Mistral-7B SentencePiece model (REFERENCE §7)."""

import os
import random
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import preprocessing_fixtures as fx  # noqa: E402
from idefics2_jax.processing.tokenizer import Idefics2Tokenizer  # noqa: E402

CORPUS = [
    "",
    "Hello world",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "   ",
    "a  b   c    d",  # whitespace runs: "▁▁" merges across words (SentencePiece itself would not)
    "\t\ttabs\tand\ttext",
    "line one\nline two\n\n\nthree\r\nwindows\r\n",
    "naïve café résumé — “quotes” ‘single’ … «guillemets»",
    "Ünïcödé straße Ελληνικά русский العربية हिन्दी 한국어 日本語のテキスト 中文",
    "emoji 😀🤖🧠 family 👩‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽",
    "e\u0301 combining, \u00a0nbsp, \u2003em space, \u3000ideographic, \u200bzero-width",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝟙𝟚𝟛 and rare 𓀀 hieroglyph",
    "\x00\x01 control \x7f chars",
    "1234567890 3.14159 -42 1e-5 0x1F 1,000,000",
    "def f(x):\n    return x ** 2  # comment\n",
    "▁already▁has▁underlines ▁",
    "User:<image>Describe this.<end_of_utterance>\nAssistant:",
    "<end_of_utterance>\nAssistant: glued",
    "x<image><image>y",
    "<image> <image>\n<image>",
    "<fake_token_around_image><image><fake_token_around_image>word",
    "<s>bos in text</s>",
    "a<unk>b",
    "<<image>>",
    "<imag partial <image",
    "Assistant: The image shows a cat.<end_of_utterance>",
    "ok" * 400,
    " " * 40 + "x",
]


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    return fx.write_reference_dir(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def ref(ref_dir):
    return fx.reference_tokenizer(ref_dir)


@pytest.fixture(scope="module")
def ours(ref_dir):
    return Idefics2Tokenizer.from_pretrained(ref_dir)


def random_texts(vocab, n, seed):
    """Texts glued together from vocabulary pieces, special tokens and whitespace: many merge boundaries."""
    rng = random.Random(seed)
    pieces = [p for p in vocab if not p.startswith("<")]
    extras = ["<image>", "<end_of_utterance>", "<fake_token_around_image>", " ", "  ", "\n", "\t", "é", "🙂"]
    out = []
    for _ in range(n):
        parts = [rng.choice(pieces).replace("▁", " ") if rng.random() < 0.85 else rng.choice(extras)
                 for _ in range(rng.randrange(1, 25))]
        out.append("".join(parts))
    return out


def test_special_tokens_and_attributes(ours, ref):
    assert ours.bos_token_id == ref.bos_token_id == 1
    assert ours.eos_token_id == ref.eos_token_id == 2
    assert ours.pad_token_id == ref.pad_token_id == 0
    assert ours.padding_side == ref.padding_side == "left"
    assert len(ours) == len(ref) == 32003
    assert sorted(ours.all_special_ids) == sorted(ref.all_special_ids)
    tokens = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "▁Hello", "<0x0A>", "not-a-piece"]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.convert_tokens_to_ids("<image>") == 32001


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_corpus(ours, ref, add_special_tokens):
    for text in CORPUS:
        expected = ref(text, add_special_tokens=add_special_tokens)["input_ids"]
        got = ours(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert got == expected, (text, ref.convert_ids_to_tokens(expected), ours.convert_ids_to_tokens(got))
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected


def test_random_texts(ours, ref):
    for text in random_texts(ours.vocab, 400, seed=0):
        assert ours(text)["input_ids"] == ref(text)["input_ids"], text


def test_non_legacy_details(ours, ref):
    # No "▁" after a special token; the first segment gets one, unless it already starts with a space.
    ids = ours("<end_of_utterance>\nAssistant:", add_special_tokens=False)["input_ids"]
    assert ours.convert_ids_to_tokens(ids) == ["<end_of_utterance>", "<0x0A>", "Ass", "istant", ":"]
    assert ours.tokenize(" a") == ["▁a"] == ref.tokenize(" a")
    assert ours.tokenize("<image>Hi") == ["<image>", "Hi"]


def test_sentencepiece_itself_differs(ours):
    # Why the encoder is a BPE over the vocabulary and not SentencePiece: they disagree on whitespace runs.
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=fx.sentencepiece_model_path())
    assert sp.encode("a  b", out_type=str) == ["▁a", "▁", "▁b"]
    assert ours.tokenize("a  b") == ["▁a", "▁▁", "b"]


def test_batch_padding(ours, ref):
    texts = ["short", "a much longer text with <image> inside\n", "", "<end_of_utterance>"]
    expected = ref(texts, padding=True, return_tensors="np")
    got = ours(texts, padding=True, return_tensors="np")
    for key in ("input_ids", "attention_mask"):
        assert got[key].dtype == expected[key].dtype
        np.testing.assert_array_equal(got[key], expected[key])
    assert ours(texts, padding=True) == {k: list(map(list, v)) for k, v in ref(texts, padding=True).items()}
    right = ours(texts, padding=True, padding_side="right", return_tensors="np")
    np.testing.assert_array_equal(right["input_ids"], ref(texts, padding=True, padding_side="right",
                                                          return_tensors="np")["input_ids"])
    with pytest.raises(ValueError, match="padding=True"):
        ours(texts, return_tensors="np")


@pytest.mark.parametrize("skip", [False, True])
def test_decode(ours, ref, skip):
    for text in CORPUS + random_texts(ours.vocab, 100, seed=1):
        ids = ref(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    rng = random.Random(2)
    # Arbitrary id sequences: stray byte pieces (invalid UTF-8 -> U+FFFD per byte), specials mid-text, ids past
    # the vocabulary (dropped).
    for _ in range(300):
        ids = [rng.randrange(32010) if rng.random() < 0.7 else rng.randrange(3, 259) for _ in range(rng.randrange(30))]
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), ids
    batch = ref(CORPUS[:6], padding=True, return_tensors="np")["input_ids"]
    assert ours.batch_decode(batch, skip_special_tokens=skip) == ref.batch_decode(batch, skip_special_tokens=skip)
    assert ours.decode(np.int64(22557)) == ref.decode(22557)


def test_save_pretrained_roundtrip(ours, ref, tmp_path):
    ours.save_pretrained(tmp_path)
    assert {"tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(tmp_path))
    again = Idefics2Tokenizer.from_pretrained(tmp_path)
    hf_again = fx.reference_tokenizer(str(tmp_path))
    for text in CORPUS:
        assert again(text)["input_ids"] == ours(text)["input_ids"] == hf_again(text)["input_ids"]


def test_reads_tokenizer_json(ref, tmp_path):
    # Hub checkpoints ship tokenizer.json; transformers 5.x then takes vocab and merges from it.
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    (tmp_path / "tokenizer.model").unlink(missing_ok=True)  # make sure nothing else could be read
    from_json = Idefics2Tokenizer.from_pretrained(tmp_path)
    for text in CORPUS + random_texts(from_json.vocab, 50, seed=3):
        assert from_json(text)["input_ids"] == ref(text)["input_ids"], text


def test_bad_input(ours, tmp_path):
    with pytest.raises(ValueError):
        ours(3)
    with pytest.raises(ValueError):
        ours(["ok", None])
    with pytest.raises(ValueError, match="tokenizer.model"):
        Idefics2Tokenizer.from_pretrained(tmp_path)
