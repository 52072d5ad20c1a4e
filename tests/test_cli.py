"""`python -m idefics2_jax demo` / `generate` end to end, against transformers' own processor + generate on the same
tiny checkpoint (which the demo writes without torch or transformers)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "What is in this picture?"


def run_cli(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "idefics2_jax", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """Built in a subprocess that asserts torch, transformers and mistral-common (test-only) were never imported."""
    d = str(tmp_path_factory.mktemp("demo") / "tiny")
    code = ("import sys; from idefics2_jax.__main__ import main; rc = main(['demo', '--dir', sys.argv[1], "
            "'--build-only']); bad = [m for m in ('torch', 'transformers', 'mistral_common') if m in sys.modules]; "
            "assert not bad, bad; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "random" in proc.stderr
    return d


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp("img") / "photo.png")
    Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8)).save(path)
    return path


def reference_answer(demo_dir, image_path, max_new_tokens):
    import torch
    import transformers
    from PIL import Image

    processor = transformers.AutoProcessor.from_pretrained(demo_dir)
    model = transformers.Idefics2ForConditionalGeneration.from_pretrained(demo_dir).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[Image.open(image_path)], return_tensors="pt")
    with torch.no_grad():  # generation_config.json (eos, pad, bad words) is read by transformers itself
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return new, processor.tokenizer.decode(new, skip_special_tokens=True)


def test_generate_streams_the_reference_answer(demo_dir, image_path, tmp_path):
    cache = tmp_path / "xla"
    proc = run_cli("generate", "--model", demo_dir, "--image", image_path, "--prompt", PROMPT,
                   "--max-new-tokens", "12", "--print-ids", "--timing", "--compilation-cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    ids_line = [line for line in proc.stderr.splitlines() if line.startswith("ids: ")]
    ids = [int(i) for i in ids_line[0][5:].split()]
    ref_ids, ref_text = reference_answer(demo_dir, image_path, 12)
    assert ids[:len(ref_ids)] == ref_ids
    assert proc.stdout == ref_text + "\n"
    assert "RANDOM weights" in proc.stderr and "timing:" in proc.stderr
    assert any(cache.iterdir())  # the persistent compilation cache was written


def test_demo_command_runs(demo_dir):
    proc = run_cli("demo", "--dir", demo_dir, "--max-new-tokens", "5", "--compilation-cache", "")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() and "RANDOM weights" in proc.stderr


def test_sampling_flags_are_reproducible(demo_dir, image_path, capsys):
    from idefics2_jax.__main__ import main

    args = ["generate", "--model", demo_dir, "--image", image_path, "--prompt", PROMPT, "--max-new-tokens", "6",
            "--sample", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--print-ids",
            "--compilation-cache", ""]
    assert main(args) == 0
    first = capsys.readouterr()
    assert main(args) == 0
    second = capsys.readouterr()
    assert first.out == second.out and "ids: " in first.err
    assert [line for line in first.err.splitlines() if line.startswith("ids")] == \
        [line for line in second.err.splitlines() if line.startswith("ids")]


def test_clear_errors(demo_dir, image_path, tmp_path, capsys):
    from idefics2_jax.__main__ import main

    def fails(args, message):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err

    base = ["generate", "--prompt", PROMPT, "--compilation-cache", ""]
    fails(base + ["--model", str(tmp_path / "missing"), "--image", image_path], "model directory not found")
    (tmp_path / "empty").mkdir()
    fails(base + ["--model", str(tmp_path / "empty"), "--image", image_path], "no config.json")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    fails(base + ["--model", demo_dir, "--image", str(broken)], "cannot read image")
    fails(base + ["--model", demo_dir, "--image", str(tmp_path / "nope.jpg")], "cannot read image")
    long_prompt = ["generate", "--model", demo_dir, "--image", image_path, "--prompt", "word " * 2100,
                   "--compilation-cache", ""]
    fails(long_prompt, "does not fit")


def test_bad_flags_and_configs_fail_in_one_line_before_loading(demo_dir, image_path, tmp_path, capsys, monkeypatch):
    """Invalid sampling flags and unreadable configs are one `error:` line, raised before any weights load."""
    import shutil

    import idefics2_jax.__main__ as cli

    def no_load(*args, **kwargs):
        raise AssertionError("load_model must not run for a bad flag")

    monkeypatch.setattr(cli, "load_model", no_load)

    def fails(args, message):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err

    base = ["generate", "--model", demo_dir, "--image", image_path, "--prompt", PROMPT, "--compilation-cache", ""]
    fails(base + ["--sample", "--temperature", "0"], "temperature must be > 0")
    fails(base + ["--top-k", "-3"], "top_k must be >= 0")
    fails(base + ["--sample", "--top-p", "2"], "top_p must be in [0, 1]")
    fails(base + ["--repetition-penalty", "0"], "repetition_penalty must be > 0")
    for name, text in (("invalid", "{not json"), ("llama", None)):
        broken = tmp_path / name
        shutil.copytree(demo_dir, broken)
        if text is None:
            config = json.loads((broken / "config.json").read_text())
            config["model_type"] = "llama"
            text = json.dumps(config)
        (broken / "config.json").write_text(text)
        fails(["generate", "--model", str(broken), "--prompt", PROMPT, "--compilation-cache", ""],
              "cannot read the configs")
