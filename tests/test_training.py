import math
import threading

import pytest
import torch
import yaml

from pathlib import Path

from dpo_space.data import SEED_SYSTEM_PROMPT
from dpo_space.errors import DPOSpaceError, TrainingError
from dpo_space.generation import Sampling, generate
from dpo_space.models import load_model
from dpo_space.training import RECIPES, RunSettings, load_adapter, read_run_config, train

FAST = dict(learning_rate=5e-3, per_device_train_batch_size=4, num_train_epochs=2, warmup_steps=0, max_length=128,
            lora_r=8, lora_alpha=16)


def settings_for(model_dir, out, **over):
    return RunSettings.for_model(str(model_dir), output_dir=str(out), **{**FAST, **over})


@pytest.fixture(scope="module")
def four_bit_run(tiny_model_dir, wakarimasen_pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run4"
    seen = []
    result = train(settings_for(tiny_model_dir, out, load_in_4bit=True), wakarimasen_pairs, on_metrics=seen.append)
    return result, seen


def test_4bit_lora_dpo_learns(four_bit_run):
    result, seen = four_bit_run
    m = result.metrics
    assert len(m) == 12 and seen == m  # 24 pairs / batch 4 × 2 epochs, one record a step, streamed as it came
    assert [r["step"] for r in m] == list(range(1, 13))
    assert m[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 1: policy == reference
    assert m[-1]["loss"] < m[0]["loss"] - 0.02
    assert [r["rewards/margins"] for r in m[-3:]] > [0, 0, 0] and m[-1]["rewards/margins"] > m[1]["rewards/margins"]
    assert sum(r["rewards/accuracies"] for r in m[-4:]) / 4 >= 0.75  # most pairs ranked right by the end
    assert "train_runtime" in result.summary and "loss" not in result.summary
    import bitsandbytes as bnb

    assert any(isinstance(x, bnb.nn.Linear4bit) for x in result.model.modules())
    trainable = [p for p in result.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # TRL's bf16 cast undone on fp32 hardware


def test_output_folder_holds_adapter_settings_metrics(four_bit_run):
    result, _ = four_bit_run
    out = result.output_dir
    assert {"adapter_model.safetensors", "adapter_config.json", "run.yaml", "metrics.csv", "train.json"} <= {
        p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".*partial"))
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,epoch,loss,rewards/chosen") and len(lines) == 13
    saved = yaml.safe_load((out / "run.yaml").read_text())
    assert saved["beta"] == 0.1 and saved["lora_r"] == 8 and saved["use_peft"] is True
    assert saved["datasets"] == [{"path": "json", "data_files": "train.json"}]
    # what ran, in TRL's keys only: the model's real path, the precision, the device; ours under env
    assert Path(saved["model_name_or_path"], "config.json").exists()
    assert (saved["dtype"], saved["bf16"], saved["fp16"], saved["use_cpu"]) == ("float32", False, False, True)
    assert saved["load_in_4bit"] is True and saved["bnb_4bit_quant_type"] == "nf4"
    assert not {"precision", "system_prompt", "eval_fraction"} & set(saved)
    assert saved["env"] == {"DPO_SPACE_SYSTEM_PROMPT": SEED_SYSTEM_PROMPT}
    values, files = read_run_config(out / "run.yaml")
    replay = RunSettings.from_dict(values)
    assert (replay.lora_r, replay.learning_rate, replay.output_dir, replay.load_in_4bit) == (8, 5e-3, str(out), True)
    assert (replay.precision, replay.system_prompt) == ("fp32", SEED_SYSTEM_PROMPT)
    assert files["train"] == str(out / "train.json")


def test_saved_adapter_reloads_to_the_same_answers(four_bit_run, tiny_model_dir):
    result, _ = four_bit_run
    greedy = Sampling(temperature=0, max_new_tokens=24)
    before = generate(result.model, result.tokenizer, "料理のコツについて教えてください。", greedy, use_adapter=True)
    base, tok = load_model(str(tiny_model_dir), load_in_4bit=True)
    reloaded = load_adapter(base, result.output_dir)
    assert generate(reloaded, tok, "料理のコツについて教えてください。", greedy, use_adapter=True) == before


def test_same_seed_same_loss_curve(tiny_model_dir, wakarimasen_pairs, tmp_path):
    curves = [
        [r["loss"] for r in train(settings_for(tiny_model_dir, tmp_path / f"r{i}", load_in_4bit=False, max_steps=4),
                                  wakarimasen_pairs).metrics]
        for i in range(2)
    ]
    assert curves[0] == curves[1] and len(curves[0]) == 4


def test_stop_request_ends_the_run_within_a_step(tiny_model_dir, wakarimasen_pairs, tmp_path):
    stop = threading.Event()

    def on_metrics(record):
        if record["step"] == 2:
            stop.set()

    result = train(settings_for(tiny_model_dir, tmp_path / "stopped", load_in_4bit=False), wakarimasen_pairs,
                   on_metrics=on_metrics, stop=stop)
    assert result.stopped and result.metrics[-1]["step"] == 3  # step 2 logged, step 3 finished, then out
    assert (result.output_dir / "adapter_model.safetensors").exists()


def test_nan_loss_stops_with_a_message_and_saves_nothing(tiny_model_dir, wakarimasen_pairs, tmp_path):
    with pytest.raises(TrainingError, match=r"the loss became nan at step 1"):
        train(settings_for(tiny_model_dir, tmp_path / "nan", load_in_4bit=False, beta=math.nan), wakarimasen_pairs)
    assert not (tmp_path / "nan").exists()


def test_a_crash_leaves_no_adapter_that_looks_complete(tiny_model_dir, wakarimasen_pairs, tmp_path, monkeypatch):
    from trl import DPOTrainer

    def boom(self, *a, **k):
        raise RuntimeError("simulated crash mid-run")

    monkeypatch.setattr(DPOTrainer, "train", boom)
    with pytest.raises(TrainingError, match="simulated crash"):
        train(settings_for(tiny_model_dir, tmp_path / "crash", load_in_4bit=False), wakarimasen_pairs)
    assert not (tmp_path / "crash").exists()


def test_bad_settings_are_named_before_loading():
    with pytest.raises(DPOSpaceError, match="beta must be > 0"):
        RunSettings(beta=0).check()
    with pytest.raises(DPOSpaceError, match="unknown run settings: lora_rank"):
        RunSettings.from_dict({"lora_rank": 4})
    with pytest.raises(DPOSpaceError, match="loss_weights has 1 values for 2 loss types"):
        RunSettings(loss_type=["sigmoid", "sft"], loss_weights=[1.0]).check()
    with pytest.raises(DPOSpaceError, match="report_to: one of none, trackio"):
        RunSettings(report_to="mlflow-typo").check()
    with pytest.raises(DPOSpaceError, match="f_divergence_type must be one of reverse_kl, .*got 'chi2'"):
        RunSettings(f_divergence_type="chi2").check()
    with pytest.raises(DPOSpaceError, match="f_divergence_type alpha_divergence works with the loss types .*apo_zero"):
        RunSettings(f_divergence_type="alpha_divergence", loss_type=["apo_zero"]).check()
    with pytest.raises(DPOSpaceError, match="f_alpha_divergence_coef must be > 0, got 0"):
        RunSettings(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0).check()


def test_a_tracker_that_is_not_installed_is_refused_by_name(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(DPOSpaceError, match="trackio package is not installed here"):
        RunSettings(report_to="trackio").check()
    RunSettings(report_to="none").check()  # never required


def test_trackio_gets_the_runs_metrics_when_asked(tiny_model_dir, wakarimasen_pairs, tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    # trackio's local store, here (it reads TRACKIO_DIR once, at import)
    monkeypatch.setattr("trackio.sqlite_storage.TRACKIO_DIR", tmp_path / "trackio")
    out = tmp_path / "run"
    result = train(settings_for(tiny_model_dir, out, load_in_4bit=False, max_steps=3, report_to="trackio"),
                   wakarimasen_pairs)
    logs = SQLiteStorage.get_logs("dpo-space", "run")
    losses = [log["train/loss"] for log in logs if "train/loss" in log]
    assert losses == pytest.approx([r["loss"] for r in result.metrics])
    assert yaml.safe_load((out / "run.yaml").read_text())["project"] == "dpo-space"  # replays to the same project


def test_sft_term_mixes_into_the_loss_with_its_weight(tiny_model_dir, wakarimasen_pairs, tmp_path):
    """At step 1 the policy is the reference, so the DPO term is exactly log 2 and the rest is w × the SFT NLL: the
    extra part must scale with the weight given."""
    def first_loss(weight):
        s = settings_for(tiny_model_dir, tmp_path / f"mix{weight}", load_in_4bit=False, loss_type=["sigmoid", "sft"],
                         loss_weights=[1.0, weight], max_steps=1)
        return train(s, wakarimasen_pairs).metrics[0]["loss"]

    half, full = (first_loss(w) - math.log(2) for w in (0.5, 1.0))
    assert half > 0.5 and full == pytest.approx(2 * half, rel=1e-4)


def test_completion_only_head_gives_the_same_log_probs(tiny_model_dir, monkeypatch):
    """On the CPU TRL scores every position through the vocabulary; ours scores only completion tokens. Same values."""
    import trl.trainer.utils as trl_utils
    from trl.trainer.utils import add_fused_lm_head

    from dpo_space.training import score_completions_only

    model, _ = load_model(str(tiny_model_dir))
    add_fused_lm_head(model)
    ids = torch.randint(3, model.config.vocab_size, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[1, 9:] = -100  # padding
    expected = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1).gather(
        -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).masked_fill(labels[:, 1:] == -100, 0)
    monkeypatch.setattr(trl_utils, "_use_triton", lambda device: False)  # TRL's own CPU path
    full = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    score_completions_only()
    assert trl_utils._use_triton(torch.device("cpu"))
    compact = model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs
    assert torch.allclose(full, expected, atol=1e-5) and torch.allclose(compact, expected, atol=1e-5)


def test_length_grouped_batches_with_an_eval_split(tiny_model_dir, wakarimasen_pairs, tmp_path):
    settings = settings_for(tiny_model_dir, tmp_path / "run", train_sampling_strategy="group_by_length",
                            eval_fraction=0.25)
    seen = []
    from transformers import TrainerCallback

    class Batches(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            seen.append(train_dataloader.dataset["length"])

    result = train(settings, wakarimasen_pairs, callbacks=[Batches()])
    assert any("eval_loss" in m for m in result.metrics)  # the eval batches are grouped too, and work
    assert seen and all(n > 0 for n in seen[0])
    saved = yaml.safe_load((result.output_dir / "run.yaml").read_text())
    assert saved["train_sampling_strategy"] == "group_by_length"


def test_chosen_and_rejected_halves_run_at_their_own_length_with_the_same_log_probs(tiny_model_dir):
    from trl.trainer.utils import add_fused_lm_head

    from dpo_space.training import pad_halves_separately, score_completions_only

    model, _ = load_model(str(tiny_model_dir))
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    score_completions_only()
    lengths = [5, 7, 14, 11]  # two short chosen sequences over two long rejected ones, right-padded to 14
    ids = torch.randint(3, model.config.vocab_size, (4, 14))
    mask = torch.tensor([[1] * n + [0] * (14 - n) for n in lengths])
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # the prompt
    whole = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    seen = []
    fused = model.forward
    model.forward = lambda **kw: seen.append(kw["input_ids"].shape) or fused(**kw)
    pad_halves_separately(model)
    halves = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert seen == [(2, 7), (2, 14)]  # the chosen half ran at 7 tokens, not 14
    assert halves.log_probs.shape == whole.log_probs.shape == (4, 13)
    for name in ("log_probs", "entropy", "mean_logits"):
        assert torch.allclose(getattr(halves, name), getattr(whole, name), atol=1e-5), name
    assert torch.equal(halves.is_top1, whole.is_top1) and torch.equal(halves.label_mask, whole.label_mask)
    assert torch.allclose(halves.loss, whole.loss, atol=1e-6)
    # anything else goes through untouched: generation, odd batches, left padding
    assert model(input_ids=ids[:3]).logits.shape == (3, 14, model.config.vocab_size)
    seen.clear()
    model(input_ids=ids, attention_mask=mask.flip(1), labels=labels, fused_lm_head=True)
    assert seen == [(4, 14)]


def test_lora_dropout_is_what_run_yaml_says_and_the_base_has_none(tiny_model_dir, wakarimasen_pairs, tmp_path):
    """TRL's disable_dropout would zero LoRA's dropout with the base's; ours keeps lora_dropout on the adapter only."""
    from transformers import TrainerCallback

    seen = {}

    class Dropouts(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Dropout):
                    seen.setdefault("lora" if "lora_dropout" in name else "base", set()).add(module.p)
            seen["attention"] = model.config.attention_dropout

    s = settings_for(tiny_model_dir, tmp_path / "drop", load_in_4bit=False, lora_dropout=0.3, max_steps=2)
    result = train(s, wakarimasen_pairs, callbacks=[Dropouts()])
    assert seen["lora"] == {yaml.safe_load((result.output_dir / "run.yaml").read_text())["lora_dropout"]} == {0.3}
    assert seen.get("base", {0.0}) == {0.0} and seen["attention"] == 0.0


def test_trls_own_cli_replays_run_yaml(tiny_model_dir, wakarimasen_pairs, tmp_path):
    """`trl dpo --config run.yaml`, from the run folder, on the CPU: every key is one TRL knows, the precision and
    device are what ran, and the rows (with their lengths, for length grouping) are train.json."""
    import subprocess
    import sys

    s = settings_for(tiny_model_dir, tmp_path / "run", train_sampling_strategy="group_by_length", max_steps=2,
                     per_device_train_batch_size=8, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=2.0)
    run = train(s, wakarimasen_pairs).output_dir
    trl = Path(sys.executable).with_name("trl")
    done = subprocess.run([str(trl), "dpo", "--config", "run.yaml", "--output_dir", str(tmp_path / "replay")],
                          cwd=run, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "replay" / "adapter_model.safetensors").exists()
    losses = [float(x) for x in __import__("re").findall(r"'loss': '([0-9.]+)'", done.stdout + done.stderr)]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-3)


def test_the_chi2_regulariser_pushes_the_rejected_answers_down_less(tiny_model_dir, wakarimasen_pairs, tmp_path):
    """f-DPO with α 2 (χ²) reaches TRL's loss and run.yaml: from the same start, the rejected answers' log-ratio falls
    less than under DPO's reverse KL (their score is bounded below), which is why the chi2 recipe exists."""
    def rejected_reward(**divergence):
        s = settings_for(tiny_model_dir, tmp_path / divergence.get("f_divergence_type", "reverse_kl"),
                         load_in_4bit=False, max_steps=6, learning_rate=2e-2, **divergence)
        result = train(s, wakarimasen_pairs)
        return result.metrics[-1]["rewards/rejected"], RunSettings.from_dict(
            read_run_config(result.output_dir / "run.yaml")[0])

    reverse_kl, _ = rejected_reward()
    chi2, replay = rejected_reward(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=2.0)
    assert reverse_kl < 0 and chi2 > reverse_kl + 0.1, (reverse_kl, chi2)  # measured: -0.21 and +0.02
    assert (replay.f_divergence_type, replay.f_alpha_divergence_coef) == ("alpha_divergence", 2.0)


def test_likelihood_displacement_warns_only_past_the_set_drop():
    from dpo_space.training import DISPLACEMENT_NATS, likelihood_displacement

    rising = [{"logps/chosen": -40.0, "logps/rejected": -50.0}, {"logps/chosen": -30.0, "logps/rejected": -80.0}]
    assert likelihood_displacement(rising) is None
    small = [{"logps/chosen": -40.0}, {"logps/chosen": -40.0 - DISPLACEMENT_NATS}]  # exactly the set drop: no warning
    assert likelihood_displacement(small) is None
    both_fall = [{"logps/chosen": -40.0, "logps/rejected": -45.0}, {"logps/chosen": -52.0, "logps/rejected": -90.0}]
    warning = likelihood_displacement(both_fall)
    assert "fell 12.0 nats" in warning and "-40.0 → -52.0" in warning and "-45.0 → -90.0" in warning
    assert likelihood_displacement(both_fall[:1]) is None and likelihood_displacement([]) is None


def test_the_probe_timeline_samples_the_first_step_every_nth_and_the_last(monkeypatch, tmp_path):
    """The timeline ends where the run ends (41 steps, every 4: 1, 4, ..., 40 and 41), so its last answer is the
    trained model's; an entry with no loss (an eval log) takes no sample."""
    from types import SimpleNamespace

    from dpo_space import generation
    from dpo_space.training import SampleTimeline, read_samples

    monkeypatch.setattr(generation, "generate", lambda model, tok, prompt, sampling, use_adapter: f"answer to {prompt}")
    timeline = SampleTimeline("probe?", every=4)
    args = SimpleNamespace(output_dir=str(tmp_path))
    for step in range(1, 42):
        state = SimpleNamespace(global_step=step, max_steps=41, is_world_process_zero=True)
        timeline.on_log(args, state, None, logs={"loss": 0.5}, model=None, processing_class=None)
        timeline.on_log(args, state, None, logs={"eval_loss": 0.5}, model=None, processing_class=None)
    samples = read_samples(tmp_path)
    assert [s["step"] for s in samples] == [1, *range(4, 41, 4), 41]
    assert samples[-1] == {"step": 41, "prompt": "probe?", "answer": "answer to probe?"}

    (tmp_path / "samples.jsonl").unlink()  # by default a tenth of the run, as the Train tab asks: the same steps
    timeline = SampleTimeline("probe?")
    for step in range(1, 42):
        state = SimpleNamespace(global_step=step, max_steps=41, is_world_process_zero=True)
        timeline.on_log(args, state, None, logs={"loss": 0.5}, model=None, processing_class=None)
    assert [s["step"] for s in read_samples(tmp_path)] == [1, *range(4, 41, 4), 41]


def test_a_recipe_overrides_a_few_fields_of_each_models_preset():
    """The gentle recipe sets β 0.5 and one epoch on whichever model it runs on, and keeps that model's own rate and
    batch (5e-4 embedded, the seed's 5e-5 for its 8B model); the seed's recipe is the preset itself; explicit values
    win over both. A model's runs start from its preset's own recipe: the seed's for the 8B model, χ² for the
    embedded one (whose seed recipe stays the seed's plain DPO at the preset's rate)."""
    from dpo_space import models

    for model in (models.EMBEDDED, "elyza-8b"):
        seed = RunSettings.for_recipe(model, "seed")
        gentle = RunSettings.for_recipe(model, "gentle")
        assert (gentle.beta, gentle.num_train_epochs, seed.beta) == (0.5, 1, 0.1)
        assert (gentle.learning_rate, gentle.per_device_train_batch_size) == (seed.learning_rate,
                                                                              seed.per_device_train_batch_size)
    seed = RunSettings.for_recipe(models.EMBEDDED, "seed")
    assert (seed.learning_rate, seed.f_divergence_type) == (5e-4, "reverse_kl")
    assert RunSettings.for_model(models.EMBEDDED) == RunSettings.for_recipe(models.EMBEDDED, "chi2")
    assert RunSettings.for_model("elyza-8b") == RunSettings.for_recipe("elyza-8b", "seed")
    assert RunSettings.for_model("some/unknown-model") == RunSettings.for_recipe("some/unknown-model", "seed")
    assert RunSettings.for_model(models.EMBEDDED, f_divergence_type="reverse_kl").f_divergence_type == "reverse_kl"
    assert all(p.recipe in RECIPES for p in models.PRESETS.values())
    assert RunSettings.for_recipe(models.EMBEDDED, "gentle", learning_rate=1e-4).learning_rate == 1e-4
    # the chi2 recipe scales each model's own rate (the χ² regulariser moves a model less per step)
    for model in (models.EMBEDDED, "elyza-8b"):
        chi2 = RunSettings.for_recipe(model, "chi2")
        assert (chi2.f_divergence_type, chi2.f_alpha_divergence_coef) == ("alpha_divergence", 2.0)
        assert chi2.learning_rate == pytest.approx(3 * RunSettings.for_recipe(model, "seed").learning_rate)
    assert RunSettings.for_recipe(models.EMBEDDED, "chi2").learning_rate == 1.5e-3  # as shown, not 0.0015000000000000002
    assert RunSettings.for_recipe(models.EMBEDDED, "chi2", learning_rate=1e-4).learning_rate == 1e-4
