import torch

from dpo_space import models
from dpo_space.models import Hardware, detect_hardware, fix_pad_token, load_model, load_tokenizer
from dpo_space.training import RunSettings


def fake_gpu(monkeypatch, capability, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    # a T4 answers True here through emulation: the precision must not trust it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_precision_follows_the_hardware(monkeypatch):
    assert detect_hardware().precision == "fp32"  # this machine: CPU
    fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    assert detect_hardware() == Hardware("cuda", "Tesla T4", "fp16")
    fake_gpu(monkeypatch, (8, 0), "NVIDIA A100")
    assert detect_hardware().precision == "bf16"


def test_t4_settings_use_fp16_and_a_paged_optimizer(tmp_path):
    config = RunSettings().dpo_config(Hardware("cuda", "Tesla T4", "fp16"), tmp_path)
    assert config.fp16 and not config.bf16 and not config.use_cpu
    assert config.optim == "paged_adamw_32bit"
    cpu = RunSettings().dpo_config(Hardware("cpu", "CPU", "fp32"), tmp_path)
    assert cpu.use_cpu and not cpu.fp16 and not cpu.bf16 and cpu.optim == "adamw_torch"


def test_quantization_config_is_nf4_double_quant_with_the_hardware_dtype():
    q = models.quantization_config(Hardware("cuda", "Tesla T4", "fp16"))
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float16


def test_pad_token_is_not_eos_when_the_vocabulary_has_another(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    tok.pad_token = tok.eos_token
    fix_pad_token(tok)
    assert tok.pad_token == "<pad>" and tok.padding_side == "left"


def test_4bit_loading_on_the_cpu_is_real(tiny_model_dir):
    import bitsandbytes as bnb

    model, tok = load_model(str(tiny_model_dir), load_in_4bit=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and layers[0].weight.quant_type == "nf4"
    ids = tok("こんにちは", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()


def test_presets_apply_their_overrides():
    s = RunSettings.for_model("embedded", beta=0.5)
    assert s.beta == 0.5 and s.per_device_train_batch_size == models.PRESETS["embedded"].settings[
        "per_device_train_batch_size"]
    seed = RunSettings.for_model("some/unknown-model")
    assert (seed.lora_r, seed.lora_alpha, seed.lora_dropout, seed.learning_rate) == (12, 12, 0.1, 5e-5)
    assert seed.lora_target_modules == ["q_proj", "v_proj"] and seed.num_train_epochs == 2
    assert all(p.needs_gpu for k, p in models.PRESETS.items() if k != "embedded")


def test_4bit_layers_still_pass_gradients_after_cpu_inference(tiny_model_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference on the first eval-mode pass, and that layout has no
    backward: a probe sample or an eval pass mid-training would silently cut the gradient. The guard undoes it."""
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    model, tokenizer = load_model(str(tiny_model_dir), load_in_4bit=True)
    model.eval()
    with torch.no_grad():
        model(**tokenizer("料理のコツを教えてください。", return_tensors="pt"))
    layer = next(m for m in model.modules() if isinstance(m, Linear4bit))
    repacked = models.keep_4bit_differentiable(model)
    assert repacked > 0 or not layer.weight.quant_state.packing_format_for_cpu  # CPUs without AVX512-BF16 never repack

    model.train()
    x = torch.randn(2, 3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    weight = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    torch.testing.assert_close(x.grad, weight.sum(0).expand_as(x), rtol=1e-2, atol=1e-2)
    with torch.no_grad():  # and it stays trainable after more inference
        model.eval()
        model(**tokenizer("料理のコツを教えてください。", return_tensors="pt"))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_the_app_serves_a_real_model_on_a_gpu_and_the_embedded_one_on_a_cpu():
    from dpo_space.models import EMBEDDED, PRESETS, Hardware, default_model

    assert default_model(Hardware("cpu", "CPU", "fp32")) == EMBEDDED
    gpu = default_model(Hardware("cuda", "Tesla T4", "fp16"))
    assert PRESETS[gpu].needs_gpu and "/" in PRESETS[gpu].model_id  # a Hub id, loaded with from_pretrained


def test_each_rank_places_its_model_on_its_own_gpu(tmp_path):
    """Under torchrun every process loads onto the GPU of its LOCAL_RANK (accelerate's local_process_index), not all
    onto cuda:0: two processes over gloo, each printing the placement it would ask for."""
    import json
    import os
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    script = tmp_path / "placement.py"
    script.write_text(
        "import json, os, sys\n"
        "from dpo_space.models import Hardware, device_map\n"
        "placed = {'rank': int(os.environ['RANK']), 'map': device_map(Hardware('cuda', 'GPU', 'bf16'), True)}\n"
        "sys.stdout.write(json.dumps(placed) + '\\n')\n",
        encoding="utf-8")
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", str(script)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    placed = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")),
                    key=lambda p: p["rank"])
    assert placed == [{"rank": 0, "map": {"": 0}}, {"rank": 1, "map": {"": 1}}]


def test_fp16_that_overflows_at_load_falls_back_to_fp32_compute(tiny_model_dir, tmp_path, monkeypatch):
    """On a GPU without bf16 (a T4), "auto" checks fp16 with one forward pass at load and, when the logits are not
    finite, reloads with fp32 compute and says why; a model that stays finite keeps fp16, and fp16 asked by name is
    kept as asked. Run on the CPU (which can compute in fp16) with a model made to overflow: weights beyond fp16's
    range."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpo_space import models

    overflowing = tmp_path / "overflow"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e7)  # ~2e5: inf in fp16 (max 65504)
    model.save_pretrained(overflowing)
    models.load_tokenizer(str(tiny_model_dir)).save_pretrained(overflowing)
    monkeypatch.setattr(models, "device_map", lambda hardware, four_bit: None)  # a "cuda" card, placed on the CPU
    t4 = models.Hardware("cuda", "Tesla T4", "fp16")

    model, _, used = models.load_for_run(str(overflowing), "auto", t4, load_in_4bit=False)
    assert used.precision == "fp32" and "fp16 overflowed" in used.note and model.dtype == torch.float32
    model, _, used = models.load_for_run(str(tiny_model_dir), "auto", t4, load_in_4bit=False)
    assert used.precision == "fp16" and model.dtype == torch.float16
    _, _, used = models.load_for_run(str(overflowing), "fp16", t4, load_in_4bit=False)
    assert used.precision == "fp16"  # asked for by name: the user's choice, no check


def test_precision_by_name_is_refused_where_the_hardware_lacks_it(monkeypatch):
    import pytest

    from dpo_space import models
    from dpo_space.errors import DPOSpaceError

    cpu = models.Hardware("cpu", "CPU", "fp32")
    assert models.with_precision(cpu, "auto") == cpu and models.with_precision(cpu, "bf16").precision == "bf16"
    with pytest.raises(DPOSpaceError, match="precision: fp16 needs a GPU"):
        models.with_precision(cpu, "fp16")
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    with pytest.raises(DPOSpaceError, match="Tesla T4 has no native bf16"):
        models.with_precision(models.Hardware("cuda", "Tesla T4", "fp16"), "bf16")
