"""benchmarks/gpu_campaign.py --smoke: the GPU campaign's code, on the CPU at tiny sizes, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 30-40 s on the shared 2-core machine (still in `make test`)
def test_gpu_campaign_smoke_runs_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_campaign.py"), "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "campaign.json").read_text(encoding="utf-8"))
    assert result["errors"] == {}, result["errors"]
    assert result["smoke"] and result["environment"]["device"] == "cpu"
    # correctness: every registered method, both engines where the method batches
    from fedlora.methods.registry import available_methods

    rows = result["correctness"]["rows"]
    assert sorted(r["method"] for r in rows) == sorted(available_methods())
    assert result["correctness"]["all_ok"], [r for r in rows if not r["ok"]]
    assert any(isinstance(r.get("device batched"), float) for r in rows)
    # DP step vs non-private, fp32 and bf16, secure and seeded noise, compiled (and Opacus, where it is installed)
    variants = {(r["precision"], r["variant"]) for r in result["dp_step"]["rows"]}
    for p in ("fp32", "bf16"):
        assert {(p, "non-private"), (p, "dp fused, secure noise"), (p, "dp fused, seeded noise"),
                (p, "dp fused, compiled, secure noise")} <= variants
    compiled = result["dp_step"]["compile"]  # train.compile: compiled here too (inductor, tiny sizes), none fell back
    assert compiled["fell_back"] == {} and set(compiled["warmup_s"]) == set(compiled["speedup"]) == {"fp32", "bf16"}
    # batched vs sequential: equal uploads, FLOPs counted
    for r in result["batched"]["rows"]:
        assert r["uploads_max_rel_diff"] < 1e-5 and r["batched_flops"] > 0 and r["speedup"] > 0
    # the grid ran its cells
    grid = result["grid"]
    assert grid["cells_run"] == len(grid["methods"]) >= 2 and all("accuracy" in r and r["epsilon_spent"] <= 3.0 + 1e-9 for r in grid["rows"])
    md = (tmp_path / "campaign.md").read_text(encoding="utf-8")
    assert "## Correctness" in md and "## DP step" in md and "## Batched" in md and "## Protocol grid" in md
