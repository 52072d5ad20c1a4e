"""Fine-tuning (issue 13): the `finetune` command end to end against peft, resume, interruption, divergence, remat,
the optimizer schedules against transformers', and 8 simulated devices against one.

The 8-device run is a subprocess (`python tests/test_finetune.py --worker DIR`) with XLA_FLAGS set before jax loads.
"""

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
N_EXAMPLES = 6


def _write_data(directory, n=N_EXAMPLES, name="train.jsonl"):
    """A small JSONL of TRL-format chats with PNG images next to it (paths relative to the file)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (30 + 7 * i, 44, 3), dtype=np.uint8)).save(
            os.path.join(directory, f"{i}.png"))
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"What is picture {i}?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is picture number {i}."}]}],
            "images": [f"{i}.png"]})
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _model_dir(tiny_torch, root):
    """The tiny reference model with a processor (Mistral tokenizer, no image splitting), both saved by
    transformers' own save_pretrained."""
    import preprocessing_fixtures as fx

    from transformers import Idefics2Processor

    from idefics2_jax.processing import DEFAULT_CHAT_TEMPLATE

    directory = str(root / "model")
    tiny_torch.save_pretrained(directory)
    source = fx.write_reference_dir(str(root / "processor_source"))
    Idefics2Processor(image_processor=fx.reference_image_processor(do_image_splitting=False),
                      tokenizer=fx.reference_tokenizer(source), chat_template=DEFAULT_CHAT_TEMPLATE,
                      image_seq_len=tiny_torch.config.perceiver_config.resampler_n_latents).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def setup(tiny_torch, tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    model_dir = _model_dir(tiny_torch, root)
    return {"root": root, "model": model_dir, "data": _write_data(str(root / "data"))}


@pytest.fixture(scope="module")
def loaded(setup):
    import idefics2_jax
    from idefics2_jax.finetune import read_jsonl
    from idefics2_jax.processing import Idefics2Processor

    model, params = idefics2_jax.load_model(setup["model"])
    processor = Idefics2Processor.from_pretrained(setup["model"])
    return model, params, processor, read_jsonl(setup["data"], processor)


def test_finetune_command_overfits_and_the_adapter_loads_in_peft(setup, loaded, tiny_torch):
    import peft
    import torch

    import idefics2_jax
    from idefics2_jax.__main__ import main
    from idefics2_jax.finetune import collate

    out = str(setup["root"] / "cli")
    rc = main(["finetune", "--model", setup["model"], "--data", setup["data"], "--eval-data", setup["data"],
               "--output", out, "--steps", "30", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-2",
               "--warmup-steps", "2", "--schedule", "constant", "--lora-r", "4", "--lora-alpha", "8",
               "--lora-dropout", "0.1", "--modules-to-save", "connector", "--save-every", "10", "--quiet"])
    assert rc == 0
    with open(os.path.join(out, "trainer_state.json"), encoding="utf-8") as f:
        state = json.load(f)
    log = state["log_history"]
    assert [r["step"] for r in log] == list(range(1, 31)) and state["global_step"] == 30
    assert log[0]["learning_rate"] == 0.0 and log[1]["learning_rate"] == pytest.approx(5e-3)
    assert all(r["tokens_per_second"] > 0 and np.isfinite(r["loss"]) for r in log)
    assert np.mean([r["loss"] for r in log[-3:]]) <= 0.5 * np.mean([r["loss"] for r in log[:2]])
    assert "eval_loss" in log[9] and "eval_loss" in log[-1] and log[-1]["eval_loss"] < log[9]["eval_loss"]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["20", "30"]  # the newest two kept

    model, params, processor, examples = loaded
    batch = collate(processor, examples[:3])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    tuned, tuned_params = idefics2_jax.load_model(setup["model"], adapter=out)
    ours = np.asarray(tuned.apply({"params": tuned_params}, **inputs).logits)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(tiny_torch), out).eval()
    with torch.no_grad():
        want = reference(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(want[valid] - ours[valid]).max() <= 1e-4
    base = np.asarray(model.apply({"params": params}, **inputs).logits)
    assert np.abs(base[valid] - ours[valid]).max() > 0.1  # the adapter changed the model


def test_full_finetune_writes_an_hf_checkpoint_transformers_loads(setup, loaded):
    import torch
    from transformers import Idefics2ForConditionalGeneration

    import idefics2_jax
    from idefics2_jax.__main__ import main
    from idefics2_jax.finetune import collate

    out = str(setup["root"] / "full")
    assert main(["finetune", "--model", setup["model"], "--data", setup["data"], "--output", out, "--steps", "4",
                 "--batch-size", "2", "--lr", "1e-3", "--full", "--remat", "--quiet"]) == 0
    log = json.load(open(os.path.join(out, "trainer_state.json"), encoding="utf-8"))["log_history"]
    assert log[-1]["loss"] < log[0]["loss"]
    model, params, processor, examples = loaded
    batch = collate(processor, examples[:2])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    tuned, tuned_params = idefics2_jax.load_model(os.path.join(out, "model"))
    ours = np.asarray(tuned.apply({"params": tuned_params}, **inputs).logits)
    reference, info = Idefics2ForConditionalGeneration.from_pretrained(os.path.join(out, "model"),
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        want = reference.eval()(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits.numpy()
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(want[valid] - ours[valid]).max() <= 1e-4
    base = np.asarray(model.apply({"params": params}, **inputs).logits)
    assert np.abs(base[valid] - ours[valid]).max() > 0.1
    assert os.path.isfile(os.path.join(out, "model", "tokenizer.json"))  # the processor travels with it


def _trainer(loaded, **overrides):
    import idefics2_jax
    from idefics2_jax.finetune.train import Trainer, TrainConfig

    model, params, _, _ = loaded
    settings = dict(steps=6, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=1, schedule="cosine", seed=3)
    lora_config = overrides.pop("lora", idefics2_jax.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1))
    return Trainer(overrides.pop("model", model), params, TrainConfig(**{**settings, **overrides}), lora_config)


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_resume_and_ctrl_c_continue_to_the_uninterrupted_weights(loaded, tmp_path):
    _, _, processor, examples = loaded
    whole = _trainer(loaded).fit(processor, examples, tmp_path / "whole", progress=False)

    def interrupt(state, record):
        if record["step"] == 2:
            raise KeyboardInterrupt

    first = _trainer(loaded).fit(processor, examples, tmp_path / "cut", progress=False, on_step=interrupt)
    assert first["interrupted"] and first["state"]["step"] == 2
    with pytest.raises(ValueError, match="already holds training checkpoints"):
        _trainer(loaded).fit(processor, examples, tmp_path / "cut", progress=False)
    with pytest.raises(ValueError, match="different run .*seed 3 -> 4"):
        _trainer(loaded, seed=4).fit(processor, examples, tmp_path / "cut", resume=True, progress=False)
    middle = _trainer(loaded).fit(processor, examples, tmp_path / "cut", resume=True, stop_after=2, progress=False)
    assert middle["state"]["step"] == 4 and not middle["interrupted"]
    rest = _trainer(loaded).fit(processor, examples, tmp_path / "cut", resume=True, progress=False)
    assert rest["state"]["step"] == 6
    assert [r["loss"] for r in rest["history"]["log_history"]] == [r["loss"] for r in whole["history"]["log_history"]]
    for got, want in zip(_leaves(rest["state"]), _leaves(whole["state"])):
        np.testing.assert_array_equal(got, want)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(loaded, tmp_path):
    import jax

    from idefics2_jax.finetune.train import TrainingDiverged

    _, _, processor, examples = loaded

    def poison(state, record):
        if record["step"] == 3:
            state["trainable"] = jax.tree.map(lambda x: x * np.nan, state["trainable"])

    trainer = _trainer(loaded, save_every=2)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4; stopped \(the last good checkpoint is step 2"):
        trainer.fit(processor, examples, tmp_path, progress=False, on_step=poison)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_remat_changes_memory_not_results(loaded):
    import jax

    model, params, processor, examples = loaded
    from idefics2_jax.finetune import collate

    batch = collate(processor, examples[:2])
    plain = _trainer(loaded, lora=None)
    remat = _trainer(loaded, lora=None, model=model.clone(remat=True))
    state = plain.init_state(len(examples))
    key = jax.random.key(0)
    (loss_a, _), grads_a = plain._grad(state["trainable"], params, batch, key)
    (loss_b, _), grads_b = remat._grad(state["trainable"], params, batch, key)
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    for a, b in zip(_leaves(grads_a), _leaves(grads_b)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    text = jax.make_jaxpr(lambda t: remat._grad(t, params, batch, key))(state["trainable"]).pretty_print()
    assert "remat" in text or "checkpoint" in text


def test_schedules_match_transformers():
    import torch
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
    from transformers import get_linear_schedule_with_warmup

    from idefics2_jax.finetune.train import TrainConfig, make_schedule

    total, warmup, lr = 20, 4, 2e-4
    for name, factory in {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup,
                          "constant": get_constant_schedule_with_warmup}.items():
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        args = (optimizer, warmup) if name == "constant" else (optimizer, warmup, total)
        scheduler = factory(*args)
        want = []
        for _ in range(total):
            want.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        schedule = make_schedule(TrainConfig(steps=total, lr=lr, warmup_steps=warmup, schedule=name), total)
        np.testing.assert_allclose([float(schedule(s)) for s in range(total)], want, rtol=1e-5, atol=1e-12)


def test_bad_flags_and_data_are_one_line_errors_before_weights_load(setup, tmp_path, capsys):
    from idefics2_jax.__main__ import main

    bad = os.path.join(os.path.dirname(setup["data"]), "bad.jsonl")  # beside the images its first line names
    with open(bad, "w", encoding="utf-8") as f:
        user_only = {"messages": [{"role": "user", "content": "hi"}]}
        f.write(open(setup["data"], encoding="utf-8").readline() + json.dumps(user_only) + "\n")
    common = ["finetune", "--model", setup["model"], "--output", str(tmp_path / "o"), "--quiet"]
    cases = {
        "bad.jsonl line 2: no assistant turn": ["--data", bad, "--steps", "2"],
        "batch_size must be a positive integer": ["--data", setup["data"], "--steps", "2", "--batch-size", "0"],
        "--mesh must look like data=2,fsdp=4": ["--data", setup["data"], "--steps", "2", "--mesh", "x=2"],
        "--full trains every parameter": ["--data", setup["data"], "--steps", "2", "--full",
                                          "--modules-to-save", "connector"],
        "does not combine with --full": ["--data", setup["data"], "--steps", "2", "--full", "--quantize", "int8"],
        "unknown quantization scheme 'int5'": ["--data", setup["data"], "--steps", "2", "--quantize", "int5"],
    }
    for message, extra in cases.items():
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "o" / "checkpoints")


# ------------------------------------------------------------------------------------ 8 simulated devices
def _worker(root):
    """Full training and LoRA on a (data=2, fsdp=4) mesh vs one device: 3 steps each, losses and weights."""
    import jax

    import idefics2_jax
    from idefics2_jax.finetune import read_jsonl
    from idefics2_jax.finetune.train import Trainer, TrainConfig
    from idefics2_jax.nn.partitioning import make_mesh
    from idefics2_jax.processing import Idefics2Processor

    assert len(jax.devices()) == 8
    processor = Idefics2Processor.from_pretrained(os.path.join(root, "model"))
    examples = read_jsonl(os.path.join(root, "data", "train.jsonl"), processor)
    results = {}
    for name, lora_config in {"lora": idefics2_jax.LoraConfig(r=4, lora_alpha=8), "full": None}.items():
        runs = {}
        for where, mesh in {"one": None, "mesh": make_mesh(data=2, fsdp=4)}.items():
            model, params = idefics2_jax.load_model(os.path.join(root, "model"), mesh=mesh)
            config = TrainConfig(steps=3, batch_size=4, grad_accum=2, lr=3e-3, seed=1)
            trainer = Trainer(model, params, config, lora_config, mesh=mesh)
            out = trainer.fit(processor, examples, os.path.join(root, f"{name}-{where}"), progress=False)
            leaves = [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(out["state"]["trainable"])]
            runs[where] = ([r["loss"] for r in out["history"]["log_history"]], leaves)
            if mesh is not None:
                spec = [x.sharding.spec for x in jax.tree.leaves(trainer.params) if x.ndim == 2 and x.size > 4096]
                results[f"{name}_sharded_weights"] = sum(any(a is not None for a in s) for s in spec)
        results[f"{name}_loss_diff"] = max(abs(a - b) for a, b in zip(runs["one"][0], runs["mesh"][0]))
        results[f"{name}_weight_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(runs["one"][1],
                                                                                        runs["mesh"][1]))
        results[f"{name}_losses"] = runs["one"][0]
    with open(os.path.join(root, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)


def test_eight_simulated_devices_match_one(setup):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(setup["root"])], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-5000:]
    with open(setup["root"] / "results.json", encoding="utf-8") as f:
        res = json.load(f)
    for name in ("lora", "full"):
        assert res[f"{name}_loss_diff"] <= 1e-5, res
        # Adam divides by sqrt(v): a float-rounding difference in a near-zero gradient moves a weight by a visible
        # fraction of one step (lr 3e-3); 1e-4 is 3% of a step.
        assert res[f"{name}_weight_diff"] <= 1e-4, res
        assert res[f"{name}_sharded_weights"] > 0  # the frozen weights really were split over fsdp
        assert res[f"{name}_losses"][-1] < res[f"{name}_losses"][0]


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, HERE)
    _worker(sys.argv[2])
