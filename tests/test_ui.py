"""The Space through its public API (gradio_client), as a second program would use it."""

import json
import re
import socket
import time

import pytest

gradio_client = pytest.importorskip("gradio_client")

from dpo_space import models, ui  # noqa: E402
from dpo_space.errors import DPOSpaceError  # noqa: E402
from dpo_space.workbench import Workbench  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from dpo_space.ui import build_app, launch

    bench = Workbench(models.EMBEDDED, root=tmp_path_factory.mktemp("space"))
    app = build_app(bench, shared=False)
    port = free_port()
    launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", bench
    app.close()


@pytest.fixture()
def client(server):
    return gradio_client.Client(server[0], verbose=False)


def new_visitor(client) -> str:
    visitor, _ = client.predict(None, api_name="/visitor")
    assert len(visitor) == 32
    return visitor


# The Train tab's widgets, keyed by RunSettings field, in the UI's own order (ui.SETTINGS)
SETTING_VALUES = dict(beta=0.1, lora_r=8, num_train_epochs=1, lora_alpha=8, lora_dropout=0.0,
                      lora_target_modules=["q_proj", "v_proj"], learning_rate=5e-4, per_device_train_batch_size=8,
                      gradient_accumulation_steps=1, max_length=256, warmup_steps=0, loss_type="sigmoid (DPO)",
                      loss_weights=1.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, seed=0,
                      load_in_4bit=True, bnb_4bit_quant_type="nf4", use_bnb_nested_quant=True,
                      gradient_checkpointing=False, precision="auto",
                      system_prompt="あなたは日本語チャットbotです。ユーザの質問答えてください。", report_to="none")
assert list(SETTING_VALUES) == list(__import__("dpo_space.ui").ui.SETTINGS)
TRAIN_ARGS = dict(model=models.EMBEDDED, max_pairs=32, probe="人はどんなことをしてもらうと嬉しいですか?",
                  **SETTING_VALUES)


NO_RATE_LIMIT = __import__("dpo_space.space").space.RateLimit(10**6, 3600, "calls")  # handlers called directly


def first(updates):
    """The first update a generator handler yields (start_run queues the run, then returns on a thread-run Space)."""
    return next(iter(updates))


def text_of(message) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def train_args(visitor):
    return [visitor, *TRAIN_ARGS.values()]


def wait_for(client, visitor, states=("done", "stopped", "failed"), timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = client.predict(visitor, api_name="/status")
        if any(s in result[0] for s in states):
            return result
        time.sleep(1)
    raise AssertionError(f"run did not finish: {result[0]}")


def finished_run_on_disk(run, status="done", **settings):
    """A run folder as a finished run leaves it (adapter config, run.yaml), and its Job record."""
    from dpo_space import data, training
    from dpo_space.workbench import Job

    run.mkdir(parents=True)
    (run / "adapter_config.json").write_text("{}")
    settings = training.RunSettings.for_model(models.EMBEDDED, output_dir=str(run), **settings)
    (run / "run.yaml").write_text(settings.to_yaml(models.detect_hardware()))
    rows = data.validate_rows([{"prompt": "q", "chosen": "a", "rejected": "b"}], source="x")
    return Job(run.name, run.parent.name, settings, rows, status=status)


def test_data_example_upload_edit_download(client, tmp_path):
    table, report = client.predict(next(iter(__import__("dpo_space.ui").ui.EXAMPLE_FILES)), api_name="/load_example")
    assert "pairs" in report and len(table["data"]) > 100
    # a broken upload: an error naming the file, and the dataset stays as it was
    broken = tmp_path / "broken.json"
    broken.write_text('[{"prompt": "q", "chosen": "a"}]', encoding="utf-8")
    _, report = client.predict(gradio_client.handle_file(str(broken)), api_name="/upload")
    assert "broken.json: row 1: 'rejected': is missing" in report and "not changed" in report
    kept = json.loads(open(client.predict(api_name="/download"), encoding="utf-8").read())
    assert len(kept) == len(table["data"])
    # a good upload replaces it, Shift-JIS too
    good = tmp_path / "good.json"
    good.write_bytes(json.dumps([{"prompt": "質問", "chosen": "良い答え", "rejected": "悪い"}],
                                ensure_ascii=False).encode("cp932"))
    table, report = client.predict(gradio_client.handle_file(str(good)), api_name="/upload")
    assert "1 pairs" in report and "cp932" in report and table["data"][0][0] == "質問"
    # an edit that breaks a row is refused with its row and field
    report = client.predict({"headers": ["prompt", "chosen", "rejected"], "data": [["質問", "同じ", "同じ"]]},
                            api_name="/edit")
    assert "row 1: 'rejected': is identical" in report


def test_train_compare_evaluate_inspect(client, server):
    visitor = new_visitor(client)
    client.predict(next(iter(__import__("dpo_space.ui").ui.EXAMPLE_FILES)), api_name="/load_example")
    assert "queued" in client.predict(*train_args(visitor), api_name="/train")[0]
    with pytest.raises(Exception, match="already have a run"):
        client.predict(*train_args(visitor), api_name="/train")
    result = wait_for(client, visitor)
    assert "done" in result[0], result[0]
    loss = [row for row in result[1]["value"]["data"] if row[1] is not None]  # (null: a series not drawn yet)
    assert "log 2" in result[1]["caption"]
    assert len(loss) == 4 and loss[0][1] == pytest.approx(0.6931, abs=1e-3)  # 32 pairs / batch 8
    assert result[5]["data"], "the sample timeline has entries"
    assert result[6].endswith("-adapter.zip") and result[7].endswith("run.yaml")
    import zipfile

    with zipfile.ZipFile(result[6]) as archive:  # the adapter, its settings and data: nothing else
        assert set(archive.namelist()) <= {"adapter_model.safetensors", "adapter_config.json", "run.yaml",
                                           "metrics.csv", "train.json", "README.md"}
        assert {"adapter_model.safetensors", "adapter_config.json", "run.yaml"} <= set(archive.namelist())
    assert "trl dpo --config run.yaml" in result[8]
    logps = [row for row in result[9]["data"] if row[1] is not None]  # the likelihood-displacement chart
    assert {row[2] for row in logps} == {"logps/chosen", "logps/rejected"} and len(logps) == 2 * len(loss)
    assert "Overlaid" not in result[0]  # a first run: nothing to overlay

    base, dpo, _, base_m, dpo_m, *_ = client.predict(visitor, "人はどんなことをしてもらうと嬉しいですか?", [], [], 0.6, 0.9,
                                                  64, 0, "あなたは日本語チャットbotです。ユーザの質問答えてください。",
                                                  api_name="/compare")
    assert base[-1]["role"] == "assistant" and base[-1]["content"]
    assert dpo[-1]["content"] and "implicit reward" in dpo_m and "distinct-2" in base_m

    table, summary, chart, csv_path = client.predict(visitor, "旅行の準備は?\n部屋の掃除のコツは?", 0.6, 0.9, 32, 0, "",
                                                     api_name="/evaluate")
    assert len(table["data"]) == 2 and "refusal" in summary and csv_path.endswith(".csv")
    assert "EAD-2" in summary and "Self-BLEU" in summary and "KL estimate" in summary and "entropy" in summary
    assert {row[0].split(" · ")[0] for row in chart["value"]["data"]} == set(ui.SUMMARY_MEASURES)

    table, summary, _ = client.predict(visitor, api_name="/inspect")
    assert "ranks" in summary and len(table["data"]) == 650

    assert "Give a write token" in client.predict(visitor, "", "", api_name="/push")


def test_second_training_waits_in_line(server):
    a, b = (gradio_client.Client(server[0], verbose=False) for _ in range(2))
    va, vb = new_visitor(a), new_visitor(b)
    for c in (a, b):
        c.predict(next(iter(__import__("dpo_space.ui").ui.EXAMPLE_FILES)), api_name="/load_example")
    a.predict(*train_args(va), api_name="/train")
    b.predict(*train_args(vb), api_name="/train")
    assert "position 1 in line" in b.predict(vb, api_name="/status")[0]
    # b stops while waiting: it never runs; a is unaffected
    assert "stopping" in b.predict(vb, api_name="/stop")
    assert "done" in wait_for(a, va)[0]
    assert "stopped" in wait_for(b, vb)[0]
    # each visitor's adapter answers only that visitor
    bench = server[1]
    assert bench.adapter_name(va) and bench.adapter_name(vb) is None


def test_one_visitor_trains_while_another_chats_and_uploads_and_neither_sees_the_other(server, tmp_path):
    a, b = (gradio_client.Client(server[0], verbose=False) for _ in range(2))
    va, vb = new_visitor(a), new_visitor(b)
    a.predict(next(iter(__import__("dpo_space.ui").ui.EXAMPLE_FILES)), api_name="/load_example")
    a.predict(*train_args(va), api_name="/train")
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps([{"prompt": "Bだけの質問", "chosen": "Bの答え", "rejected": "違う"}], ensure_ascii=False),
                    encoding="utf-8")
    b.predict(gradio_client.handle_file(str(mine)), api_name="/upload")
    base, dpo, *_ = b.predict(vb, "猫が喉を鳴らすのはなぜですか?", [], [], 0.6, 0.9, 32, 0, "", api_name="/compare")
    assert base[-1]["content"] and "no DPO model yet" in text_of(dpo[-1])
    assert "No run yet" in b.predict(vb, api_name="/status")[0]  # b sees nothing of a's run
    assert "done" in wait_for(a, va)[0]
    assert json.loads(open(b.predict(api_name="/download"), encoding="utf-8").read())[0]["prompt"] == "Bだけの質問"
    assert len(json.loads(open(a.predict(api_name="/download"), encoding="utf-8").read())) == 650
    bench = server[1]
    assert bench.adapter_name(va) and bench.adapter_name(vb) is None
    _, dpo, *_ = b.predict(vb, "猫が喉を鳴らすのはなぜですか?", [], [], 0.6, 0.9, 32, 0, "", api_name="/compare")
    assert "no DPO model yet" in text_of(dpo[-1])  # a's adapter never answers b


def test_engine_errors_reach_the_page_as_their_message(client):
    visitor = new_visitor(client)
    client.predict(next(iter(__import__("dpo_space.ui").ui.EXAMPLE_FILES)), api_name="/load_example")
    for args, api in (([visitor, "", 0.6, 0.9, 32, 0, ""], "/evaluate"), ([visitor], "/inspect")):
        with pytest.raises(Exception, match="no DPO model yet: train one in the Train tab first"):
            client.predict(*args, api_name=api)
    with pytest.raises(Exception, match="unknown visitor: reload the page"):
        client.predict("../../etc", api_name="/stop")


def test_build_extreme_fills_rejected_with_the_base_models_answers(client):
    prompts = "猫が喉を鳴らすのはなぜですか?\n雨の日の週末におすすめの過ごし方は?\n\n"
    table, report = client.predict(prompts, "分かりません。", api_name="/build_extreme")
    rows = table["data"]
    assert "2 pairs" in report and [r[0] for r in rows] == ["猫が喉を鳴らすのはなぜですか?", "雨の日の週末におすすめの過ごし方は?"]
    assert all(r[1] == "分かりません。" and r[2] and r[2] != r[1] for r in rows)
    with pytest.raises(Exception, match="at least one prompt"):
        client.predict("  \n", "分かりません。", api_name="/build_extreme")


def test_clear_empties_both_columns(client):
    base, dpo, base_m, dpo_m, second, second_m = client.predict(api_name="/clear")
    assert base == [] and dpo == [] and second == [] and base_m == dpo_m == second_m == ""


def test_every_bad_file_is_refused_through_the_app_and_the_dataset_stays(client):
    from tests.test_bad_inputs import BAD, CASES

    table, _ = client.predict(next(iter(__import__("dpo_space.ui").ui.EXAMPLE_FILES)), api_name="/load_example")
    for name, problems in CASES.items():
        _, report = client.predict(gradio_client.handle_file(str(BAD / name)), api_name="/upload")
        assert "not changed" in report and name in report, (name, report)
        assert all(phrase in report for _, _, phrase in problems), (name, report)
    kept = json.loads(open(client.predict(api_name="/download"), encoding="utf-8").read())
    assert [r["prompt"] for r in kept] == [r[0] for r in table["data"]]


def test_the_hub_token_is_used_for_the_push_only(tmp_path, monkeypatch, caplog):
    """Never echoed, logged, put in the environment or written anywhere under the Space's folder."""
    import logging
    import os

    import huggingface_hub

    from dpo_space import training, ui
    from dpo_space.workbench import new_visitor_id

    token = "hf_SECRETsecretSECRETsecret0123456789"
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id))

        def upload_folder(self, *, folder_path, repo_id, allow_patterns):
            calls.append(("upload", sorted(allow_patterns)))
            raise RuntimeError(f"401 Client Error: Unauthorized for token {token}")

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    bench = Workbench(models.EMBEDDED, root=tmp_path / "space")
    visitor = new_visitor_id()
    job = finished_run_on_disk(tmp_path / "space" / visitor / "run")
    bench._jobs[visitor] = job
    caplog.set_level(logging.DEBUG)

    message = ui.push_adapter(bench, visitor, token, "someone/adapter")
    assert message.startswith("Push failed: RuntimeError") and "***" in message and token not in message
    assert calls[0] == ("token", token)  # given to the Hub client for this call, and nowhere else
    assert "train.json" not in calls[2][1] and "adapter_model.safetensors" in calls[2][1]
    assert token not in caplog.text
    assert token not in "".join(os.environ.values())
    for path in (tmp_path / "space").rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path
    assert "token" not in {f.name for f in __import__("dataclasses").fields(training.RunSettings)}


def test_a_finished_runs_files_are_read_once_not_on_every_status_tick(tmp_path, monkeypatch):
    """The Train status overlays earlier runs every second while a run trains; their files never change once finished,
    so they are read once per folder (and again only if its run.yaml is rewritten)."""
    import os

    from dpo_space import training

    run = tmp_path / "20260101-093000-aaaaaa"
    finished_run_on_disk(run, beta=0.25)
    (run / "metrics.csv").write_text("step,loss\n1,0.69\n2,0.5\n")
    reads = []
    real = training.read_metrics
    monkeypatch.setattr(training, "read_metrics", lambda d: reads.append(d) or real(d))
    for _ in range(3):
        label, metrics = ui.finished_run(run)
    assert "09:30:00 · β 0.25" in label and [m["loss"] for m in metrics] == [0.69, 0.5] and len(reads) == 1
    os.utime(run / "run.yaml", ns=(1, 1))  # rewritten: read again
    assert ui.finished_run(run)[1] == metrics and len(reads) == 2


def test_a_status_tick_that_races_the_runs_end_keeps_polling(tmp_path):
    """The trainer thread ends a run while a status tick is being drawn: the tick reads the run's state once, so a tick
    that shows "running" keeps the timer on and the next one draws "done" (the page once stayed at its last step)."""
    from dpo_space.workbench import new_visitor_id

    bench = Workbench(models.EMBEDDED, root=tmp_path / "space")
    visitor = new_visitor_id()
    job = finished_run_on_disk(tmp_path / "space" / visitor / "20260101-093000-aaaaaa", status="running")

    class EndsWhileDrawn:  # "running" when first read, "done" ever after
        reads = 0

        def __getattr__(self, name):
            return getattr(job, name)

        @property
        def status(self):
            self.reads += 1
            return "running" if self.reads == 1 else "done"

        @property
        def active(self):
            return self.status in ("queued", "running")

    bench.job = lambda v: EndsWhileDrawn()
    out = ui.run_status(bench, visitor)
    assert out[0].startswith("running") and out[-1].active  # drawn as running: the timer ticks once more
    bench.job = lambda v: job
    job.status = "done"
    out = ui.run_status(bench, visitor)
    assert out[0].startswith("done") and not out[-1].active


def test_runs_from_the_space_never_trust_remote_code(tmp_path, monkeypatch):
    from dpo_space import ui
    from dpo_space.workbench import new_visitor_id

    bench = Workbench(models.EMBEDDED, root=tmp_path / "space")
    submitted = []
    monkeypatch.setattr(bench, "submit", lambda visitor, settings, pairs, **kw: submitted.append(settings) or
                        type("J", (), {"id": "x"})())
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(4)]
    shared = ui.Limits.for_space(True)
    first(ui.start_run(bench, shared, NO_RATE_LIMIT, new_visitor_id(), rows, *TRAIN_ARGS.values()))
    assert submitted and submitted[0].trust_remote_code is False
    assert bench.trust_remote_code is False

    args = dict(TRAIN_ARGS, model="someone/model-with-its-own-code")  # only the listed models are accepted
    with pytest.raises(DPOSpaceError, match="Unknown model 'someone/model-with-its-own-code'"):
        first(ui.start_run(bench, shared, NO_RATE_LIMIT, new_visitor_id(), rows, *args.values()))
    assert all(not p.settings.get("trust_remote_code") for p in models.PRESETS.values())


def submitted_runs(tmp_path, monkeypatch):
    bench = Workbench(models.EMBEDDED, root=tmp_path / "space")
    runs = []
    monkeypatch.setattr(bench, "submit", lambda visitor, settings, pairs, **kw: runs.append((settings, pairs)) or
                        type("J", (), {"id": "x"})())
    return bench, runs


def test_every_visitor_size_is_capped_by_name_on_the_shared_space_and_a_cap_never_raises(tmp_path, monkeypatch):
    from dpo_space import ui
    from dpo_space.workbench import new_visitor_id

    limits = ui.Limits.for_space(True)
    bench, runs = submitted_runs(tmp_path, monkeypatch)
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(800)]

    def start(n_rows=800, **over):
        values = {**TRAIN_ARGS, "max_pairs": 800, **over}
        status, _ = first(ui.start_run(bench, limits, NO_RATE_LIMIT, new_visitor_id(), rows[:n_rows],
                                       *values.values()))
        return status, runs[-1][0], len(runs[-1][1])

    status, settings, n = start(per_device_train_batch_size=1, num_train_epochs=3)
    assert "the first 700 pairs" in status and n == 700
    assert "400 steps, not 2100" in status and settings.max_steps == 400
    status, settings, n = start(n_rows=32, num_train_epochs=1)  # a small run is not stretched to the cap
    assert "4 steps" in status and settings.max_steps == -1 and n == 32 and "cap" not in status
    status, settings, _ = start(num_train_epochs=6)
    assert "4 epochs, not 6" in status and settings.num_train_epochs == 4
    with pytest.raises(DPOSpaceError, match="max_length: at most 1024"):
        start(max_length=4096)
    with pytest.raises(DPOSpaceError, match="max_new_tokens: at most 256"):
        ui.sampling_from(0.6, 0.9, 2048, 0, "", limits)
    assert ui.sampling_from(0.6, 0.9, 1000, 0, "", ui.Limits.for_space(False)).max_new_tokens == 1000


def test_every_offered_recipe_starts_on_the_shared_space_as_the_recipe_says(tmp_path, monkeypatch):
    from dpo_space import training, ui
    from dpo_space.workbench import new_visitor_id

    bench, runs = submitted_runs(tmp_path, monkeypatch)
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(650)]
    for recipe in ui.RECIPE_LABELS:
        values = [v["value"] if isinstance(v, dict) else v for v in ui.recipe_values(models.EMBEDDED, recipe)]
        status, _ = first(ui.start_run(bench, ui.Limits.for_space(True), NO_RATE_LIMIT, new_visitor_id(), rows,
                                       models.EMBEDDED, 650, "", *values))
        expected = training.RunSettings.for_recipe(models.EMBEDDED, recipe)
        ran = runs[-1][0]
        for name in ui.SETTINGS:
            assert getattr(ran, name) == getattr(expected, name), (recipe, name)
        assert "cap" not in status, (recipe, status)


def test_each_setting_shown_in_the_ui_reaches_trl():
    """Change one widget: what TRL, PEFT or bitsandbytes gets changes (or, for the system prompt, the rows)."""
    from dataclasses import asdict

    from dpo_space import data, training, ui

    other = dict(beta=0.3, lora_r=4, num_train_epochs=3, lora_alpha=4, lora_dropout=0.05,
                 lora_target_modules=["q_proj", "k_proj"], learning_rate=1e-4, per_device_train_batch_size=2,
                 gradient_accumulation_steps=3, max_length=512, warmup_steps=0.2, loss_type="ipo", loss_weights=0.5,
                 f_divergence_type="alpha_divergence", f_alpha_divergence_coef=2.0, seed=7, load_in_4bit=False,
                 bnb_4bit_quant_type="fp4", use_bnb_nested_quant=False,
                 gradient_checkpointing=True, precision="bf16", system_prompt="別の指示", report_to="trackio")
    assert set(other) == set(ui.SETTINGS)
    hardware = models.Hardware("cpu", "CPU", "fp32")
    base_values = dict(SETTING_VALUES, loss_type="sigmoid + sft")  # so that the SFT weight is in play

    def seen(values):
        settings = training.RunSettings.for_model(models.EMBEDDED, **ui.settings_values(list(values.values())))
        run_hw = models.with_precision(hardware, settings.precision)
        configs = settings.trl_configs(run_hw)
        pairs = data.validate_rows([{"prompt": "q", "chosen": "a", "rejected": "b"}], source="x")
        rows = data.as_training_rows(pairs, system_prompt=settings.system_prompt, chat_template=True)
        return {name: (c.to_dict() if hasattr(c, "to_dict") else asdict(c) if c is not None else None)
                for name, c in configs.items()}, rows

    before = seen(base_values)
    for name in ui.SETTINGS:
        changed = {**base_values, name: other[name]}
        if name == "bnb_4bit_quant_type" or name == "use_bnb_nested_quant":
            changed["load_in_4bit"] = True
        after = seen(changed)
        trl_seen = {k: v for k, v in after[0].items() if k != "model"}  # ModelConfig only feeds the other three
        assert trl_seen != {k: v for k, v in before[0].items() if k != "model"} or after[1] != before[1], name


def test_memory_estimate_shown_and_a_warning_before_a_run_that_would_not_fit(monkeypatch):
    from dpo_space import ui
    from dpo_space.training import RunSettings

    text, warning = ui.memory_check(models.detect_hardware(), "elyza-8b", RunSettings.for_model("elyza-8b"))
    assert "Estimated peak GPU memory" in text and "T4 16 GB fits" in text and warning is None
    gpu = models.Hardware("cuda", "Tesla T4", "fp16")
    monkeypatch.setattr(ui, "gpu_memory_gib", lambda hardware: 14.7)
    big = RunSettings.for_model("elyza-8b", per_device_train_batch_size=8, gradient_accumulation_steps=1,
                                gradient_checkpointing=False)
    text, warning = ui.memory_check(gpu, "elyza-8b", big)
    assert "14.7 GiB" in warning
    batch, accum = map(int, re.search(r"per_device_train_batch_size (\d+) × gradient_accumulation_steps (\d+)",
                                      warning).groups())
    assert batch * accum == 8 and batch < 8
    assert "**Warning:**" in text


def test_compare_scores_each_answer_in_its_own_conversation_from_the_second_turn_on():
    """The two columns diverge after the first answer: the DPO answer's reward is scored after the DPO column's own
    history, never the base column's."""
    from dpo_space import ui
    from dpo_space.workbench import new_visitor_id

    class Bench:
        scored = None

        def adapter_name(self, visitor):
            return "v"

        def run_dir(self, visitor):
            return "/runs/v"

        def answer(self, visitor, conversation, sampling, *, dpo, run_id=None):
            yield "DPOの答え" if dpo else "ベースの答え"

        def rewards(self, visitor, scored, system_prompt, run_id=None):
            Bench.scored = scored
            return [0.1, 0.2]

    visitor = new_visitor_id()
    base = [{"role": "user", "content": "一問目"}, {"role": "assistant", "content": "ベースの一答目"}]
    dpo = [{"role": "user", "content": "一問目"}, {"role": "assistant", "content": "分かりません。"}]
    *_, last = ui.compare(Bench(), ui.Limits(), NO_RATE_LIMIT, visitor, "二問目", base, dpo, 0.6, 0.9, 32, 0, "")
    (base_conv, base_answer), (dpo_conv, dpo_answer) = Bench.scored
    assert base_conv[1]["content"] == "ベースの一答目" and base_answer == "ベースの答え"
    assert dpo_conv[1]["content"] == "分かりません。" and dpo_answer == "DPOの答え"
    assert dpo_conv[-1] == {"role": "user", "content": "二問目"}
    assert "+0.20" in last[4] and "+0.10" in last[3]


def test_two_answers_that_come_back_word_for_word_are_drawn_again_hotter():
    """A question the model knows by heart gives the same sample twice at 0.9: the second is drawn again at 1.1, 1.3,
    1.5, then 1.7, each with a seed of its own, until it differs (identical answers make no pair); one that differs at
    once is kept as drawn."""
    from dpo_space.workbench import new_visitor_id

    class Bench:
        def __init__(self, same_below):
            self.same_below, self.temperatures = same_below, []

        def base_answers(self, prompts, sampling):
            self.temperatures.append((sampling.temperature, sampling.seed))
            hot = sampling.temperature >= self.same_below
            return ["暗記した答え"] * (len(prompts) - 1) + [f"{sampling.temperature}の答え" if hot else "暗記した答え"]

    hotter = [(0.9, 5), (1.1, 6), (1.3, 7), (1.5, 8), (1.7, 9)]  # and another seed each time
    for same_below, drawn, b in ((0.9, hotter[:1], "0.9の答え"), (1.3, hotter[:3], "1.3の答え"), (2.0, hotter, "暗記した答え")):
        bench = Bench(same_below)
        a, got = ui.two_answers(bench, ui.Limits(), NO_RATE_LIMIT, new_visitor_id(), "質問", 5)
        assert (a, got, bench.temperatures) == ("暗記した答え", b, drawn)


def test_the_inspector_formats_pairs_as_the_run_trained_them(tmp_path, monkeypatch):
    """Its system prompt and β are the run's, not the Compare tab's."""
    from dpo_space import data, workbench
    from dpo_space.training import RunSettings
    from dpo_space.workbench import Job, new_visitor_id

    bench = Workbench(models.EMBEDDED, root=tmp_path / "space")
    visitor = new_visitor_id()
    settings = RunSettings.for_model(models.EMBEDDED, system_prompt="走ったときの指示", beta=0.3)
    bench._jobs[visitor] = Job("run", visitor, settings, data.PreferenceData([]), status="done")
    monkeypatch.setattr(bench, "_dpo_run", lambda v: "/runs/" + v)
    calls = []
    monkeypatch.setattr(workbench.gpu, "pair_report", lambda rows, beta, system_prompt, run_dir:
                        calls.append((beta, system_prompt, run_dir)) or [])
    bench.pair_report(visitor, [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    assert calls == [(0.3, "走ったときの指示", "/runs/" + visitor)]


def test_token_audit_counts_with_the_picked_models_tokenizer(server, monkeypatch):
    c = gradio_client.Client(server[0], verbose=False)
    with pytest.raises(Exception, match="No data"):
        c.predict(models.EMBEDDED, 1024, "", api_name="/token_lengths")
    c.predict(next(iter(ui.EXAMPLE_FILES)), api_name="/load_example")
    audit = c.predict(models.EMBEDDED, 1024, "", api_name="/token_lengths")
    assert "650 pairs" in audit and "| chosen |" in audit and "cuts 0%" in audit
    assert "cuts 100%" in c.predict(models.EMBEDDED, 8, "", api_name="/token_lengths")
    def unreachable(model_id):
        raise OSError(f"we could not connect to the Hub for {model_id}")

    ui._tokenizer.cache_clear()
    monkeypatch.setattr(models, "load_tokenizer", unreachable)  # the same process serves the page
    qwen = models.PRESETS["qwen2.5-0.5b"].model_id
    with pytest.raises(Exception, match=f"could not load the tokenizer of '{qwen}'.*could not connect"):
        c.predict("qwen2.5-0.5b", 1024, "", api_name="/token_lengths")


def test_runs_side_by_side_in_charts_compare_and_evaluate(server):
    """A visitor's runs stay side by side: the second run's charts overlay the first, Compare answers from the base and
    both runs in three columns, and Evaluate summarises all three models in one table and one chart."""
    c = gradio_client.Client(server[0], verbose=False)
    visitor = new_visitor(c)
    c.predict(next(iter(ui.EXAMPLE_FILES)), api_name="/load_example")
    args = dict(TRAIN_ARGS, max_pairs=16)
    ids = []
    for beta in (0.1, 0.5):
        c.predict(visitor, *dict(args, beta=beta).values(), api_name="/train")
        result = wait_for(c, visitor)
        assert "done" in result[0]
        ids.append(re.search(r"/(\d{8}-\d{6}-[0-9a-f]{6})", result[0]).group(1))
        time.sleep(1.1)  # run ids are by the second
    choices = c.predict(visitor, api_name="/runs")["choices"]
    assert [run_id for _, run_id in choices] == ids[::-1]  # newest first, labelled by settings
    assert "β 0.5" in choices[0][0] and "β 0.1" in choices[1][0]
    drawn = {row[2] for row in result[1]["value"]["data"] if row[1] is not None}
    assert drawn == {"loss", "run −1 · loss"} and f"**run −1** = {choices[1][0]}" in result[0]  # the first run overlaid
    assert {row[2] for row in result[1]["value"]["data"]} == {"loss", "run −1 · loss", "run −2 · loss"}

    out = c.predict(visitor, "旅行の準備は?", [], [], 0.0, 0.9, 24, 0, "", ids, [], api_name="/compare")
    base, first_run, _, _, first_m, second_run, second_m = out
    assert base[-1]["content"] and first_run[-1]["content"] and second_run[-1]["content"]
    assert choices[1][0] in first_m and choices[0][0] in second_m and "implicit reward" in second_m
    with pytest.raises(Exception, match="at most two runs"):
        c.predict(visitor, "旅行の準備は?", [], [], 0.0, 0.9, 24, 0, "", ids + ids[:1], [], api_name="/compare")

    c.predict(visitor, api_name="/eval_runs")  # the Evaluate tab opens: its run list is read
    table, summary, chart, _ = c.predict(visitor, "旅行の準備は?\n部屋の掃除のコツは?", 0.0, 0.9, 16, 0, "", ids,
                                         api_name="/evaluate")
    assert table["headers"][:4] == ["prompt", "base", choices[1][0], choices[0][0]]
    assert summary.count("- **") == 3 and {row[2] for row in chart["value"]["data"]} == {"base", choices[1][0], choices[0][0]}
    _, summary, *_ = c.predict(visitor, "旅行の準備は?", 0.0, 0.9, 16, 0, "", [], 0, api_name="/evaluate")
    assert "samples of each" not in summary and "KL estimate" not in summary  # K = 0: the sampling is skipped
    with pytest.raises(Exception, match=r"samples per prompt \(K\)|maximum"):
        c.predict(visitor, "旅行の準備は?", 0.0, 0.9, 16, 0, "", [], 99, api_name="/evaluate")
    import shutil

    shutil.rmtree(server[1].root / visitor / ids[0])  # retention removed the first run while the page still lists it
    with pytest.raises(Exception, match="no longer on disk"):
        c.predict(visitor, "旅行の準備は?", [], [], 0.0, 0.9, 24, 0, "", ids, [], api_name="/compare")


def test_pairs_collected_in_the_browser_and_a_game_that_ends_in_a_run(server):
    """On-policy data: the base answers twice, the visitor's pick becomes a pair in the dataset; a game of ten prompts
    keeps its pairs apart and ends in a run on them."""
    c = gradio_client.Client(server[0], verbose=False)
    visitor = new_visitor(c)
    c.predict(next(iter(ui.EXAMPLE_FILES)), api_name="/load_example")
    a, b = c.predict(visitor, "旅行の準備は?", 0, api_name="/two_answers")
    assert a and b and a != b  # two samples
    table, report, prompt, *_ = c.predict(visitor, "旅行の準備は?", a, b, "", 0, api_name="/pick_a")
    assert len(table["data"]) == 651 and table["data"][-1] == ["旅行の準備は?", a, b] and "651 pairs" in report
    with pytest.raises(Exception, match="Write your own answer first"):
        c.predict(visitor, "旅行の準備は?", a, b, "  ", 0, api_name="/pick_own")
    table, *_ = c.predict(visitor, "旅行の準備は?", a, b, "前日までに持ち物を書き出しましょう。", 0, api_name="/pick_own")
    assert table["data"][-1] == ["旅行の準備は?", "前日までに持ち物を書き出しましょう。", a]
    with pytest.raises(Exception, match="is identical"):  # a pick that is no preference is refused, the data kept
        c.predict(visitor, "旅行の準備は?", a, a, "", 0, api_name="/pick_a")

    prompt, a, b, _, status = c.predict(visitor, 0, api_name="/start_game")
    assert "Prompt 1 of 10" in status and prompt in ui.game_prompts(0)
    from dpo_space import corpus, embedded

    held = embedded.excluded_from_sft(embedded.read_corpus())  # a game's pairs train a run: never a held-out prompt
    assert not {corpus.key(p) for p in ui.game_prompts(0)} & held
    with pytest.raises(Exception, match="Finish the game first: 0 of 10"):
        c.predict(visitor, *list(TRAIN_ARGS.values()), api_name="/train_game")
    for i in range(10):
        _, _, prompt, a, b, _, status = c.predict(visitor, prompt, a, b, "", 0, api_name="/pick_b")
    assert "10 pairs collected" in status
    out = c.predict(visitor, *list(TRAIN_ARGS.values()), api_name="/train_game")
    table, report, queued = out[0], out[1], out[2]
    assert len(table["data"]) == 10 and "10 pairs" in report and "queued" in queued
    assert "done" in wait_for(c, visitor)[0]


def test_the_server_keeps_at_most_its_session_cap_of_gradio_sessions(tmp_path, monkeypatch):
    """Gradio keeps every session's state (a closed tab's too) up to its state_session_capacity, 10,000 by default:
    memory that grows with each visitor. The Space's cap (Retention.sessions) reaches the launch; the least recently
    used session goes first."""
    from dpo_space.ui import build_app, launch

    monkeypatch.setenv("DPO_SPACE_SESSIONS", "3")
    app = build_app(Workbench(models.EMBEDDED, root=tmp_path), shared=False)
    port = free_port()
    launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(5):
            c = gradio_client.Client(url, verbose=False)
            c.predict(None, api_name="/visitor")
            c.close()
        assert app.state_holder.capacity == 3
        assert json.loads(gradio_client.Client(url, verbose=False).predict(api_name="/health"))["sessions"] <= 3
    finally:
        app.close()


def test_a_runs_label_names_the_divergence_a_recipe_changed():
    """Two runs that differ only in the regulariser (the seed's recipe and the χ² one) read differently in the run
    pickers; DPO's own reverse KL is not spelled out."""
    from dpo_space import training, ui

    plain = ui.run_label(training.RunSettings.for_recipe(models.EMBEDDED, "seed"), "20261129-134501-abcdef")
    chi2 = ui.run_label(training.RunSettings.for_recipe(models.EMBEDDED, "chi2"), "20261129-134501-abcdef")
    assert plain.startswith("13:45:01 · β 0.1") and "div" not in plain and "lr 0.0005" in plain
    assert "sigmoid · α-div 2 · lr 0.0015" in chi2


def test_a_recipe_shows_the_sft_weight_and_alpha_only_where_its_loss_uses_them():
    from dpo_space import ui

    def shown(recipe):
        values = dict(zip(ui.SETTINGS, ui.recipe_values(models.EMBEDDED, recipe), strict=True))
        return {name: values[name]["visible"] for name in ("loss_weights", "f_alpha_divergence_coef")}

    assert shown("seed") == {"loss_weights": False, "f_alpha_divergence_coef": False}
    assert shown("remedies") == {"loss_weights": True, "f_alpha_divergence_coef": False}
    assert shown("chi2") == {"loss_weights": False, "f_alpha_divergence_coef": True}


def test_the_train_tab_opens_on_the_models_own_recipe_and_follows_the_model(tmp_path):
    """The embedded model's runs start from χ² (its ordinary-set run keeps what the model knows), the GPU models' from
    the seed's: the recipe menu opens on it with its settings (α shown), and a change of model switches both."""
    from dpo_space import training, ui

    app = ui.build_app(Workbench(models.EMBEDDED, root=tmp_path), shared=False)
    blocks = list(app.blocks.values())
    assert next(b for b in blocks if getattr(b, "elem_id", None) == "recipe").value == "chi2"
    alpha = next(b for b in blocks if getattr(b, "label", None) == "α (f_alpha_divergence_coef)")
    assert alpha.visible and alpha.value == 2.0
    assert next(b for b in blocks if getattr(b, "label", None) == "learning_rate").value == 1.5e-3
    for model, expected in ((models.EMBEDDED, "chi2"), ("elyza-8b", "seed")):
        recipe, *values = ui.model_values(model)
        assert recipe == expected
        assert [v["value"] if isinstance(v, dict) else v for v in values] == ui.widget_values(
            training.RunSettings.for_model(model))
