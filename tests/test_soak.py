"""A dozen visitors against the real app (bench/soak.py, small): every one trains, chats and evaluates without an
error; retention evicts runs and the early visitors are told so; the chat model never holds more adapters than its
cap, and the runs' folder stays within the disk budget. The 60-visitor figures are in BENCHMARKS.md."""

import sys

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_a_dozen_visitors_leave_the_space_bounded():
    import soak

    budget, cap = 10.0, 4  # two or three runs of the embedded preset (LoRA on every linear layer: up to ~5 MiB a run)
    result = soak.run(visitors=12, at_once=3, pairs=8, minutes=10, disk_budget_mib=budget, max_adapters=cap,
                      sessions=8)
    assert result["errors"] == []  # the early visitors' "removed to make room" is checked inside, as an error if not
    assert result["runs"] == 12
    assert result["max_adapters_seen"] <= cap and result["max_sessions_seen"] <= 8  # Gradio's, bounded too
    _, disk_end, *_ = result["last"]
    assert disk_end <= budget  # measured once no run is queued or training: runs and their adapter zips together
