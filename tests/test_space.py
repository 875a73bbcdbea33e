"""The Space's rules without Gradio: caps that only lower, retention of runs, rate limits."""

import os

import pytest

from dpo_space import models, space
from dpo_space.errors import DPOSpaceError
from dpo_space.training import RunSettings


def fake_run(root, visitor, name, mib=1):
    run = root / visitor / name
    run.mkdir(parents=True)
    (run / "adapter_config.json").write_text("{}")
    (run / "run.yaml").write_text("beta: 0.1\n")
    (run / "adapter_model.safetensors").write_bytes(os.urandom(int(mib * 2**20)))
    return run


def test_a_small_run_is_never_stretched_to_a_cap():
    s = RunSettings.for_model(models.EMBEDDED, per_device_train_batch_size=8, num_train_epochs=1)
    fitted = space.fit_run(s, 32, space.Limits.for_space(True))
    assert (fitted.steps, fitted.settings.max_steps, fitted.notes) == (4, -1, ())
    big = space.fit_run(RunSettings.for_model(models.EMBEDDED, per_device_train_batch_size=1, num_train_epochs=3), 650,
                        space.Limits.for_space(True))
    assert big.steps == 400 and big.settings.max_steps == 400 and "max_steps" in big.notes[0]


def test_retention_keeps_each_visitors_newest_runs_and_a_disk_budget_never_touching_a_run_in_progress(tmp_path):
    a = [fake_run(tmp_path, "a" * 32, f"2026010{i}-000000-aaaaaa") for i in range(1, 5)]
    b = [fake_run(tmp_path, "b" * 32, f"2026020{i}-000000-bbbbbb", mib=3) for i in range(1, 3)]
    keep = space.Retention(runs_per_visitor=3, disk_budget_mib=100)
    assert space.runs_to_evict(tmp_path, keep, active=set()) == [a[0]]  # a's oldest: beyond its newest three
    tight = space.Retention(runs_per_visitor=3, disk_budget_mib=7)
    evicted = space.runs_to_evict(tmp_path, tight, active={b[0]})
    assert a[0] in evicted and b[0] not in evicted  # a run in progress stays whatever the budget
    kept = [r for r in a + b if r not in evicted]
    assert sum(space.folder_mib(r) for r in kept) <= 7 and b[1] in kept  # the newest stay, oldest go first


def test_the_disk_budget_counts_each_runs_adapter_zip(tmp_path):
    runs = [fake_run(tmp_path, "a" * 32, f"2026010{i}-000000-aaaaaa", mib=2) for i in range(1, 4)]
    for run in runs:  # its download beside it: as large again, an fp32 adapter barely compresses
        space.adapter_zip(run).write_bytes(os.urandom(2 * 2**20))
    assert space.run_mib(runs[0]) == pytest.approx(4.0, abs=0.01)
    evicted = space.runs_to_evict(tmp_path, space.Retention(disk_budget_mib=9), active=set())
    assert evicted == runs[:1]  # 12 MiB with the zips (6 without them, within the budget): the oldest goes
    assert space.folder_mib(tmp_path) - sum(space.run_mib(r) for r in evicted) <= 9


def test_downloads_of_a_run_removed_meanwhile_leave_nothing_behind(tmp_path):
    import shutil
    import zipfile

    run = fake_run(tmp_path, "a" * 32, "20260101-000000-aaaaaa")
    archive, yaml_file, command = space.run_downloads(run)
    assert archive == str(space.adapter_zip(run)) and yaml_file == str(run / "run.yaml")
    assert f"unzip {run.name}-adapter.zip -d adapter\n" in command and "--config adapter/run.yaml" in command
    assert "run.yaml" in zipfile.ZipFile(archive).namelist()  # at the zip's top: `-d adapter` makes the folder
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name, f"{run.name}-adapter.zip"]  # no temporary left
    space.adapter_zip(run).unlink()
    shutil.rmtree(run)  # retention removed it between the page's check and this call
    assert space.run_downloads(run)[:2] == (None, None)
    assert not list(run.parent.iterdir())  # no zip of nothing beside a run that is not there


def test_rate_limits_name_their_cap_and_forget_visitors_who_left():
    limit = space.RateLimit(2, 60, "answers")
    limit.check("v", now=0)
    limit.check("v", now=1)
    with pytest.raises(DPOSpaceError, match=r"answers: at most 2 per 1 minutes.*try again in 59 s"):
        limit.check("v", now=1)
    limit.check("v", now=61)  # the window moved on
    limit.check("w", now=200)
    assert "v" not in limit._events  # a visitor gone for a window leaves no record


def test_retention_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("DPO_SPACE_MAX_ADAPTERS", "3")
    monkeypatch.setenv("DPO_SPACE_DISK_BUDGET_MIB", "500.5")
    r = space.Retention.from_env()
    assert (r.max_adapters, r.disk_budget_mib, r.runs_per_visitor) == (3, 500.5, 3)
