import pytest

from dpo_space import memory, models


@pytest.fixture(scope="module")
def elyza():
    return memory.shape_for("elyza/Llama-3-ELYZA-JP-8B")


def test_an_8b_model_in_nf4_weighs_what_it_should(elyza):
    e = memory.estimate(elyza, batch=1, max_length=1024, checkpointing=True, with_chat_copy=False)
    assert 6.9e9 < elyza.linear_params < 7.0e9  # Llama-3-8B: 8.03B with the 1.05B of embedding and head
    assert 5.0 < e.weights / memory.GIB < 6.0  # nf4 linear weights + bf16 embeddings: about 5.3 GiB
    assert e.total < 14.7 * memory.GIB  # the preset's batch 1 with checkpointing fits a T4, on its own
    with_chat = memory.estimate(elyza, batch=1, max_length=1024, checkpointing=True)
    assert with_chat.chat == pytest.approx(memory.chat_copy(elyza))
    assert with_chat.total == pytest.approx(e.total + with_chat.chat)
    assert 5.0 < with_chat.chat / memory.GIB < 9.0  # a second copy of the weights, its KV cache, eight adapters


def test_activations_scale_with_batch_and_length_and_checkpointing_cuts_them(elyza):
    base = memory.estimate(elyza, batch=1, max_length=512)
    assert memory.estimate(elyza, batch=2, max_length=512).activations == pytest.approx(2 * base.activations, rel=1e-3)
    assert memory.estimate(elyza, batch=1, max_length=1024).activations == pytest.approx(2 * base.activations, rel=1e-3)
    assert memory.estimate(elyza, batch=1, max_length=512, checkpointing=True).activations < base.activations / 5
    assert memory.estimate(elyza, batch=1, max_length=512, load_in_4bit=False).weights > 2.5 * base.weights


def test_the_plan_fits_each_gpu_and_prefers_no_checkpointing(elyza):
    t4 = memory.plan(elyza, memory.GPUS["T4 16 GB"], effective_batch=8, max_length=1024, with_chat_copy=False)
    assert t4.fits and t4.checkpointing and t4.batch * t4.accumulation == 8
    assert t4.estimate.total <= 14.7 * memory.GIB
    a100 = memory.plan(elyza, memory.GPUS["A100 80 GB"], effective_batch=8, max_length=1024)
    assert a100.fits and not a100.checkpointing and a100.batch > 1 and a100.estimate.chat > 0
    assert not memory.plan(elyza, memory.GPUS["T4 16 GB"], effective_batch=8, max_length=1024).fits  # beside chat
    too_small = memory.plan(elyza, 4.0, effective_batch=8, max_length=1024)
    assert not too_small.fits


def test_shapes_come_from_presets_or_a_local_config(tiny_model_dir):
    embedded = memory.shape_for(models.EMBEDDED)
    assert (embedded.layers, embedded.hidden, embedded.vocab, embedded.tied) == (4, 256, 6000, True)
    assert memory.shape_for(str(tiny_model_dir)).layers == 2
    assert memory.shape_for("someone/unknown-model") is None  # offline and not a preset: no estimate, no error


def test_every_gpu_preset_fits_a_t4_at_its_own_settings():
    """The Space suggests a T4: a preset's defaults must not need more (the seed's author hit CUDA errors above
    batch 1). The small presets fit beside the Space's chat copy; the 8B one fits only alone, so the Space lends it
    the chat copy's base and pauses chat while it trains (workbench.shares_base)."""
    from dpo_space.training import RunSettings

    t4 = memory.GPUS["T4 16 GB"]
    alone_only = set()
    for key, preset in models.PRESETS.items():
        if not preset.needs_gpu:
            continue
        s = RunSettings.for_model(key)
        assert memory.settings_estimate(s, key, with_chat_copy=False).total <= t4 * memory.GIB, key
        if not memory.fits_beside_chat(s, key, t4):
            alone_only.add(key)
    assert alone_only == {"elyza-8b"}
