"""`finetune.collate` and `read_jsonl` against transformers' Idefics2Processor (REFERENCE §11: label masking).

The labelled tokens are checked against facts from the reference processor: for every assistant turn, the
reference's tokenization of the conversation up to that turn with the generation prompt (what the model is given at
inference) is a prefix of the full sequence, the labelled run starts right after it, ends with `<end_of_utterance>`
and decodes to exactly the turn's text; nothing else is labelled.
"""

import json

import numpy as np
import pytest
from PIL import Image

import preprocessing_fixtures as fx
from idefics2_jax import finetune
from idefics2_jax.processing import Idefics2Processor

EOU = "<end_of_utterance>"


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    directory = fx.write_reference_dir(str(tmp_path_factory.mktemp("processor")))
    return (fx.reference_processor(directory, do_image_splitting=False),
            Idefics2Processor.from_pretrained(directory, do_image_splitting=False))


def _images():
    return [Image.fromarray(fx.gradient_rgb(h, w, seed)) for seed, (h, w) in enumerate([(60, 80), (90, 50), (40, 40)])]


def _examples():
    a, b, c = _images()
    return [
        {"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A gradient, mostly blue."}]},
            {"role": "user", "content": [{"type": "text", "text": "And these two?"}, {"type": "image"},
                                         {"type": "image"}]},
            {"role": "assistant", "content": "Two more: 42 stripes!\nThat is all."}],
         "images": [a, b, c]},
        {"messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Teal"}],
         "images": []},
        {"messages": [
            {"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "image"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Stripes"}]},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "You're welcome <3"}],
         "images": [b]},
    ]


def _as_blocks(example):
    """String contents as one text block: the reference's template would iterate a string's characters."""
    return {**example, "messages": [{**m, "content": [{"type": "text", "text": m["content"]}]
                                     if isinstance(m["content"], str) else m["content"]} for m in example["messages"]]}


def _text(content):
    return content if isinstance(content, str) else "".join(b["text"] for b in content if b["type"] == "text")


def _ref_ids(ref, messages, images, add_generation_prompt=False):
    prompt = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    return list(ref(text=prompt, images=images or None)["input_ids"][0])


def _runs(mask):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_collate_labels_exactly_what_the_assistant_generates(procs):
    ref, ours = procs
    batch = finetune.collate(ours, _examples())
    examples = [_as_blocks(e) for e in _examples()]
    for key, value in finetune.collate(ours, examples).items():  # a string content is a text block
        np.testing.assert_array_equal(batch[key], value)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "pixel_attention_mask"}
    want = ref(text=[ref.apply_chat_template(e["messages"]) for e in examples],
               images=[e["images"] for e in examples], padding=True, padding_side="right", return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], want["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"], want["attention_mask"])
    np.testing.assert_array_equal(batch["pixel_values"], want["pixel_values"])
    np.testing.assert_array_equal(batch["pixel_attention_mask"], want["pixel_attention_mask"])
    eou = ref.tokenizer.convert_tokens_to_ids(EOU)
    for row, example in enumerate(examples):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        labelled = labels != -100
        np.testing.assert_array_equal(labels[labelled], ids[labelled])  # labels are the tokens themselves
        runs = _runs(labelled)
        turns = [i for i, m in enumerate(example["messages"]) if m["role"] == "assistant"]
        assert len(runs) == len(turns)
        for (start, stop), i in zip(runs, turns):
            seen = sum(b["type"] == "image" for m in example["messages"][:i] for b in m["content"])
            prefix = _ref_ids(ref, example["messages"][:i], example["images"][:seen], add_generation_prompt=True)
            assert list(ids[:len(prefix)]) == prefix and start == len(prefix)
            assert ids[stop - 1] == eou
            assert ref.tokenizer.decode(ids[start:stop]) == _text(example["messages"][i]["content"]) + EOU
            assert ref.tokenizer.decode(ids[stop:stop + 1]) == "\n"  # the newline after it is not learned


def test_max_length_names_the_sample_and_padding_buckets(procs):
    _, ours = procs
    examples = _examples()
    lengths = [int(finetune.collate(ours, [e])["attention_mask"].sum()) for e in examples]
    with pytest.raises(ValueError, match=rf"sample 0 has {lengths[0]} tokens, more than max_length"):
        finetune.collate(ours, examples, max_length=lengths[0] - 1)
    batch = finetune.collate(ours, examples[1:], max_length=max(lengths[1:]), pad_to_multiple_of=64)
    assert batch["input_ids"].shape[1] % 64 == 0 and (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_read_jsonl_resolves_paths_and_names_the_bad_line(procs, tmp_path):
    _, ours = procs
    _images()[0].save(tmp_path / "a.png")
    good = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
                         {"role": "assistant", "content": "Hello"}], "images": ["a.png"]}
    examples = finetune.read_jsonl(_write_jsonl(tmp_path / "ok.jsonl", [good, good]), ours)
    assert [e["images"] for e in examples] == [[str(tmp_path / "a.png")]] * 2
    direct = finetune.collate(ours, [{**good, "images": [Image.open(tmp_path / "a.png")]}])
    from_file = finetune.collate(ours, examples[:1])
    for key in direct:
        np.testing.assert_array_equal(from_file[key], direct[key])
    user_only = {"messages": good["messages"][:1], "images": ["a.png"]}
    bad = {
        "not JSON": "{not json",
        "no assistant turn": user_only,
        "1 image blocks in the messages but 2 images": {**good, "images": ["a.png", "a.png"]},
        "cannot read image 'missing.png'": {**good, "images": ["missing.png"]},
    }
    for message, row in bad.items():
        path = _write_jsonl(tmp_path / "bad.jsonl", [good, row])
        with pytest.raises(ValueError, match=f"bad.jsonl line 2: {message}"):
            finetune.read_jsonl(path, ours)
    with pytest.raises(ValueError, match="line 1 has .* tokens, more than max_length=10"):
        finetune.read_jsonl(tmp_path / "ok.jsonl", ours, max_length=10)
