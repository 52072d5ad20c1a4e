"""Processor parity with transformers' `Idefics2Processor` (LlamaTokenizer + PIL image processor), REFERENCE §7."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

import preprocessing_fixtures as fx  # noqa: E402
from idefics2_jax.processing import DEFAULT_CHAT_TEMPLATE, Idefics2Processor  # noqa: E402

STEP = 1 / 127.5


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return fx.write_reference_dir(str(tmp_path_factory.mktemp("processor")))


@pytest.fixture(scope="module")
def ref(hf_dir):
    return fx.reference_processor(hf_dir)


@pytest.fixture(scope="module")
def ref_nosplit(hf_dir):
    return fx.reference_processor(hf_dir, do_image_splitting=False)


@pytest.fixture(scope="module")
def ours(hf_dir):
    return Idefics2Processor.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def photos():
    return {name: fx.photo(name) for name in ("chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg")}


def assert_same(expected, got):
    assert set(got) == set(expected)
    for key in ("input_ids", "attention_mask", "pixel_attention_mask"):
        if key in expected:
            assert got[key].dtype == expected[key].dtype, key
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    if "pixel_values" in expected:
        assert got["pixel_values"].shape == expected["pixel_values"].shape
        diff = np.abs(got["pixel_values"] - expected["pixel_values"])
        assert diff.max() <= STEP + 1e-7 and diff.mean() < 1e-3


def chat(*turns):
    """turns: (role, [str | None]) with None for an image."""
    return [{"role": role, "content": [{"type": "image"} if part is None else {"type": "text", "text": part}
                                       for part in parts]} for role, parts in turns]


CHATS = [
    chat(("user", [None, "Describe this."])),
    chat(("user", [None, None, "What differs between these two?"]), ("assistant", ["The lighting."]),
         ("user", ["And this one?", None])),
    chat(("system", ["Be brief."]), ("user", ["Hello!"]), ("assistant", ["Hi."]), ("user", ["Bye 👋"])),
]


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template(ours, ref, generation_prompt):
    for messages in CHATS:
        expected = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == expected
    assert ours.apply_chat_template(CHATS[:2], add_generation_prompt=True) == ref.apply_chat_template(
        CHATS[:2], add_generation_prompt=True)
    assert ours.apply_chat_template(CHATS[0], add_generation_prompt=True) == (
        "User:<image>Describe this.<end_of_utterance>\nAssistant:")


def test_multi_image_multi_turn_chat(ours, ref, photos):
    prompt = ours.apply_chat_template(CHATS[1], add_generation_prompt=True)
    images = [photos["chelsea.png"], photos["rocket.jpg"], photos["hubble_deep_field.jpg"]]
    expected = ref(text=prompt, images=images, return_tensors="np")
    got = ours(text=prompt, images=images, return_tensors="np")
    assert_same(expected, got)
    assert (got["input_ids"] == ours.image_token_id).sum() == 3 * 5 * ours.image_seq_len


def test_batch_with_2_0_1_images(ours, ref, photos):
    texts = [ours.apply_chat_template(CHATS[1][:1], add_generation_prompt=True),
             ours.apply_chat_template(CHATS[2], add_generation_prompt=True),
             ours.apply_chat_template(CHATS[0], add_generation_prompt=True)]
    flat = [photos["chelsea.png"], photos["coffee.png"], photos["rocket.jpg"]]
    expected = ref(text=texts, images=flat, padding=True, return_tensors="np")
    got = ours(text=texts, images=flat, padding=True, return_tensors="np")
    assert_same(expected, got)
    assert got["pixel_values"].shape[:2] == (3, 10) and not got["pixel_attention_mask"][1].any()
    nested = [flat[:2], [], flat[2:]]
    assert_same(ref(text=texts, images=nested, padding=True, return_tensors="np"),
                ours(text=texts, images=nested, padding=True, return_tensors="np"))


def test_without_splitting(ours, ref_nosplit, photos):
    texts = ["User:<image><image>Compare.<end_of_utterance>\nAssistant:", "<image>In this image,"]
    images = [[photos["coffee.png"], photos["hubble_deep_field.jpg"]], [photos["chelsea.png"]]]
    expected = ref_nosplit(text=texts, images=images, padding=True, return_tensors="np")
    got = ours(text=texts, images=images, padding=True, return_tensors="np", do_image_splitting=False)
    assert_same(expected, got)
    assert (got["input_ids"] == ours.image_token_id).sum() == 3 * ours.image_seq_len
    # Loaded with splitting off: the same from the attribute.
    assert_same(expected, Idefics2Processor(ours.image_processor.from_dict(
        {**fx.PREPROCESSOR_CONFIG, "do_image_splitting": False}), ours.tokenizer)(
        text=texts, images=images, padding=True, return_tensors="np"))


def test_call_time_split_override_keeps_text_and_pixels_consistent(ours):
    # The reference expands <image> from its attribute only, so this call would give 5x64 tokens for 1 crop.
    image = Image.fromarray(fx.gradient_rgb(300, 400))
    for split, crops in ((False, 1), (True, 5)):
        out = ours(text="<image>", images=[image], do_image_splitting=split, return_tensors="np")
        assert out["pixel_values"].shape[1] == crops
        assert (out["input_ids"] == ours.image_token_id).sum() == crops * ours.image_seq_len


@pytest.mark.parametrize("text", [
    "<image>word glued after the image",
    "<image><image>adjacent images",
    "<image> spaced",
    "<image>\nnewline",
    "x<image>y<image><end_of_utterance>",
    "<image><fake_token_around_image>literal fake",
])
def test_expansion_rules(ours, ref, text):
    n = text.count("<image>")
    images = [Image.fromarray(fx.gradient_rgb(120, 150, seed=i)) for i in range(n)]
    assert_same(ref(text=text, images=images, return_tensors="np"), ours(text=text, images=images, return_tensors="np"))


def test_text_only_and_images_only(ours, ref, photos):
    texts = ["Just text, no images.", "Two\nlines"]
    assert_same(ref(text=texts, padding=True, return_tensors="np"), ours(text=texts, padding=True, return_tensors="np"))
    assert ours(text="hi")["input_ids"] == ref(text="hi")["input_ids"]
    images = [photos["coffee.png"], photos["chelsea.png"]]
    assert_same(ref(images=images, return_tensors="np"), ours(images=images, return_tensors="np"))


def test_exif_orientation_applied(ours, ref, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(fx.gradient_rgb(220, 330, seed=9)).save(tmp_path / "rot.jpg", exif=exif)
    image = Image.open(tmp_path / "rot.jpg")
    got = ours(text="<image>", images=[image], return_tensors="np")
    assert_same(ref(text="<image>", images=[image], return_tensors="np"), got)
    path_out = ours(text="<image>", images=[str(tmp_path / "rot.jpg")], return_tensors="np")
    np.testing.assert_array_equal(path_out["pixel_values"], got["pixel_values"])


def test_transparent_images_composited_onto_white(ours, ref):
    # The reference processor runs convert("RGB") before its image processor, which drops alpha; ours keeps the
    # image processor's white compositing, so it equals the reference fed the already composited image.
    rgba = fx.made_images()["RGBA"]
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    composited = Image.alpha_composite(white, rgba).convert("RGB")
    assert_same(ref(text="<image>", images=[composited], return_tensors="np"),
                ours(text="<image>", images=[rgba], return_tensors="np"))


def test_image_count_errors(ours):
    image = Image.fromarray(fx.gradient_rgb(50, 50))
    with pytest.raises(ValueError, match="Prompt 1 has 1 <image> markers but 0 images"):
        ours(text=["<image>", "<image>"], images=[[image], []])
    with pytest.raises(ValueError, match="Prompt 0 has 1 <image> markers but 2 images"):
        ours(text=["<image>", "none"], images=[[image, image], []])
    with pytest.raises(ValueError, match="2 <image> markers in total .* but 3 images"):
        ours(text=["<image>", "<image>"], images=[image, image, image])
    with pytest.raises(ValueError, match="but no images were given"):
        ours(text="<image> without pixels")
    with pytest.raises(ValueError, match="1 prompts but 2 lists"):
        ours(text="<image>", images=[[image], [image]])
    with pytest.raises(ValueError, match="Cannot read image"):
        ours(text="<image>", images=[__file__])
    with pytest.raises(ValueError, match="Cannot decode"):
        ours(text="<image>", images=[_truncated_png()])
    with pytest.raises(ValueError):
        ours()


def _truncated_png():
    import io

    data = io.BytesIO()
    Image.fromarray(fx.gradient_rgb(200, 200)).save(data, "PNG")
    return Image.open(io.BytesIO(data.getvalue()[: len(data.getvalue()) // 2]))


def test_jax_tensors(ours):
    out = ours(text=["<image>a", "b"], images=[[Image.fromarray(fx.gradient_rgb(40, 60))], []], padding=True,
               return_tensors="jax")
    assert {k: str(v.dtype) for k, v in out.items()} == {"input_ids": "int32", "attention_mask": "int32",
                                                         "pixel_values": "float32", "pixel_attention_mask": "int32"}


def test_batch_decode(ours, ref, photos):
    texts = ["User:<image>Describe this.<end_of_utterance>\nAssistant: A cat 🐱.", "Hello"]
    ids = ref(text=texts, images=[[photos["chelsea.png"]], []], padding=True, return_tensors="np")["input_ids"]
    for skip in (True, False):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == ref.batch_decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids[1], skip_special_tokens=True) == "Hello"


def test_from_pretrained_attributes(ours):
    assert ours.image_seq_len == 64
    assert ours.image_processor.do_image_splitting is True
    assert ours.tokenizer.padding_side == "left"
    assert (ours.fake_image_token_id, ours.image_token_id, ours.end_of_utterance_token_id) == (32000, 32001, 32002)
    assert ours.chat_template == DEFAULT_CHAT_TEMPLATE


def test_chat_template_sources(hf_dir, tmp_path, ours):
    # No template stored anywhere: the published Idefics2 template.
    bare = fx.write_reference_dir(str(tmp_path / "bare"))
    with open(os.path.join(bare, "processor_config.json"), "w") as f:
        json.dump({"image_seq_len": 64}, f)
    assert Idefics2Processor.from_pretrained(bare).chat_template == DEFAULT_CHAT_TEMPLATE
    # A stored template is the one rendered, with trim_blocks / lstrip_blocks as transformers sets them.
    custom = "{% for m in messages %}\n  [{{ m['role'] }}]{{ bos_token }}\n{% endfor %}"
    with open(os.path.join(bare, "chat_template.jinja"), "w") as f:
        f.write(custom)
    loaded = Idefics2Processor.from_pretrained(bare)
    messages = chat(("user", ["hi"]), ("assistant", ["yo"]))
    ref = fx.reference_processor(bare)
    ref.chat_template = custom
    assert loaded.apply_chat_template(messages) == ref.apply_chat_template(messages) == (
        "  [user]<s>\n  [assistant]<s>\n")  # trim_blocks ate the newline after each {% for %}


def test_save_pretrained_roundtrip(ours, ref, tmp_path, photos):
    ours.save_pretrained(tmp_path)
    assert {"tokenizer.model", "tokenizer_config.json", "preprocessor_config.json",
            "processor_config.json"} <= set(os.listdir(tmp_path))
    again = Idefics2Processor.from_pretrained(tmp_path)
    assert again.chat_template == ours.chat_template and again.image_seq_len == ours.image_seq_len
    prompt = again.apply_chat_template(CHATS[0], add_generation_prompt=True)
    assert_same(ref(text=prompt, images=[photos["coffee.png"]], return_tensors="np"),
                again(text=prompt, images=[photos["coffee.png"]], return_tensors="np"))
    # transformers can read the converted directory too.
    from transformers import Idefics2Processor as HFProcessor

    hf = HFProcessor.from_pretrained(str(tmp_path))
    assert hf.image_seq_len == 64 and hf.image_processor.do_image_splitting is True
    text = "User: no image here<end_of_utterance>\nAssistant:"
    assert hf(text=text)["input_ids"] == ours(text=text)["input_ids"]


def test_apply_chat_template_tokenize(ours, ref, photos):
    messages = [{"role": "user", "content": [{"type": "image", "image": photos["coffee.png"]},
                                             {"type": "text", "text": "What is this?"}]}]
    got = ours.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="np")
    prompt = ref.apply_chat_template(messages, add_generation_prompt=True)
    assert_same(ref(text=prompt, images=[photos["coffee.png"]], return_tensors="np"), got)


def test_runs_without_torch_or_transformers(hf_dir):
    # The preprocessing path must not import torch or transformers (checked in a fresh interpreter).
    import subprocess

    code = (
        "import sys\n"
        "import numpy as np\n"
        "from idefics2_jax.processing import Idefics2Processor\n"
        f"p = Idefics2Processor.from_pretrained({hf_dir!r})\n"
        "msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Hi'}]}]\n"
        "prompt = p.apply_chat_template(msgs, add_generation_prompt=True)\n"
        "out = p(text=prompt, images=[np.zeros((20, 30, 3), np.uint8)], return_tensors='np')\n"
        "p.batch_decode(out['input_ids'])\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_reads_what_transformers_save_pretrained_writes(ref, photos, tmp_path):
    """transformers >= 5.24 writes processor_config.json with the image processor nested in it, tokenizer.json
    (no tokenizer.model) and chat_template.jinja, and no preprocessor_config.json: loaded as transformers loads it."""
    from transformers import AutoProcessor

    ref.save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    assert not (tmp_path / "tokenizer.model").exists()
    theirs = AutoProcessor.from_pretrained(tmp_path)
    loaded = Idefics2Processor.from_pretrained(tmp_path)
    for messages in CHATS[:2]:
        prompt = theirs.apply_chat_template(messages, add_generation_prompt=True)
        assert loaded.apply_chat_template(messages, add_generation_prompt=True) == prompt
        images = [photos["chelsea.png"], photos["rocket.jpg"], photos["coffee.png"]][:prompt.count("<image>")]
        assert_same(theirs(text=prompt, images=images, return_tensors="np"),
                    loaded(text=prompt, images=images, return_tensors="np"))
