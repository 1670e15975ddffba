"""The GPT benchmark's ``--quick`` run (a subprocess): every optimizer and every width run
writes its results with the documented structure, and every run's validation loss falls."""

import json
import math
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parents[1]


@pytest.mark.slow
def test_quick_run_writes_every_result_and_every_loss_falls(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpt.py"), "--quick", "--out", str(tmp_path)],
        check=True,
        timeout=600,
    )
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpt

    res = json.loads((tmp_path / "gpt.json").read_text())
    assert {r["optimizer"] for r in res["runs"]} == set(gpt.LRS)
    assert set(res["summary"]) == set(gpt.LRS) and res["machine"] and res["seconds"] > 0
    adam = res["summary"]["adamw"]
    assert adam["ratio"] == 1.0 and adam["step_time_ratio"] == 1.0
    for s in res["summary"].values():
        assert s["final_val"] > 0 and s["step_time_ratio"] > 0
        assert s["ratio"] is None or s["ratio"] > 0
    width = json.loads((tmp_path / "gpt_width.json").read_text())
    assert set(width["summary"]) == set(gpt.WIDTH_LRS) and width["seconds"] > 0
    for n, s in width["summary"].items():
        assert set(s["per_width"]) == {str(d) for d in width["widths"]}
        assert s["grid_shift"] is None or abs(s["grid_shift"]) < len(gpt.WIDTH_LRS[n])
    for r in res["runs"] + width["runs"]:
        first, last = r["curve"][0][2], r["curve"][-1][2]
        assert math.isfinite(last) and last < first, (r["optimizer"], r["lr"], r["d"], first, last)
    for name in ("gpt.png", "gpt_width.png", "gpt.md"):
        assert (tmp_path / name).stat().st_size > 100
