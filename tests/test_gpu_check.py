"""bench/gpu_check.py is known to work before GPU time is spent on it: its dry run, on the CPU."""

import json
import sys

from tests.conftest import ROOT


def test_the_gpu_check_runs_dry_on_the_cpu(capsys, tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# B\n\n## On a GPU\n\nold\n\n## Many visitors\n\nkept\n", encoding="utf-8")
    assert gpu_check.main(["--dry-run", "--write", str(out)]) == 0
    table = capsys.readouterr().out
    assert "embedded, DPO Space default, fp32" in table and "qwen2.5-0.5b shape, seed recipe" in table
    assert "planner error" in table and "the preset is" in table
    written = out.read_text(encoding="utf-8")
    assert "old" not in written and "## Many visitors\n\nkept" in written and "the CPU (dry run)" in written


def test_the_shapes_are_the_planners():
    from dpo_space import memory

    shapes = json.loads((ROOT / "bench" / "shapes.json").read_text(encoding="utf-8"))
    for model_id, config in shapes.items():
        assert memory.Shape.from_config(config) == memory.Shape.from_config(memory.SHAPES[model_id]), model_id
