import pytest

from dpo_space import memory, models


@pytest.fixture(scope="module")
def elyza():
    return memory.shape_for("elyza/Llama-3-ELYZA-JP-8B")


def test_an_8b_model_in_nf4_weighs_what_it_should(elyza):
    e = memory.estimate(elyza, batch=1, max_length=1024, checkpointing=True)
    assert 6.9e9 < elyza.linear_params < 7.0e9  # Llama-3-8B: 8.03B with the 1.05B of embedding and head
    assert 5.0 < e.weights / memory.GIB < 6.0  # nf4 linear weights + bf16 embeddings: about 5.3 GiB
    assert e.total < 14.7 * memory.GIB  # the preset's batch 1 with checkpointing fits a T4


def test_activations_scale_with_batch_and_length_and_checkpointing_cuts_them(elyza):
    base = memory.estimate(elyza, batch=1, max_length=512)
    assert memory.estimate(elyza, batch=2, max_length=512).activations == pytest.approx(2 * base.activations, rel=1e-3)
    assert memory.estimate(elyza, batch=1, max_length=1024).activations == pytest.approx(2 * base.activations, rel=1e-3)
    assert memory.estimate(elyza, batch=1, max_length=512, checkpointing=True).activations < base.activations / 5
    assert memory.estimate(elyza, batch=1, max_length=512, load_in_4bit=False).weights > 2.5 * base.weights


def test_the_plan_fits_each_gpu_and_prefers_no_checkpointing(elyza):
    t4 = memory.plan(elyza, memory.GPUS["T4 16 GB"], effective_batch=8, max_length=1024)
    assert t4.fits and t4.checkpointing and t4.batch * t4.accumulation == 8
    assert t4.estimate.total <= 14.7 * memory.GIB
    a100 = memory.plan(elyza, memory.GPUS["A100 80 GB"], effective_batch=8, max_length=1024)
    assert a100.fits and not a100.checkpointing and a100.batch > 1
    too_small = memory.plan(elyza, 4.0, effective_batch=8, max_length=1024)
    assert not too_small.fits


def test_shapes_come_from_presets_or_a_local_config(tiny_model_dir):
    embedded = memory.shape_for(models.EMBEDDED)
    assert (embedded.layers, embedded.hidden, embedded.vocab, embedded.tied) == (4, 256, 4000, True)
    assert memory.shape_for(str(tiny_model_dir)).layers == 2
    assert memory.shape_for("someone/unknown-model") is None  # offline and not a preset: no estimate, no error


def test_every_gpu_preset_fits_a_t4_at_its_own_settings():
    """The Space suggests a T4: a preset's defaults must not need more (the seed's author hit CUDA errors above
    batch 1)."""
    from dpo_space.training import RunSettings

    for key, preset in models.PRESETS.items():
        if not preset.needs_gpu:
            continue
        s = RunSettings.for_model(key)
        e = memory.estimate(memory.shape_for(preset.model_id), batch=s.per_device_train_batch_size,
                            max_length=s.max_length, lora_r=s.lora_r, lora_targets=tuple(s.lora_target_modules),
                            checkpointing=s.gradient_checkpointing)
        assert e.total <= memory.GPUS["T4 16 GB"] * memory.GIB, key
