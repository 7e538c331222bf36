"""The prepared GPU run (bench/gpu.py), rehearsed on the CPU with --dry-run, so that a
mistake in it costs a test failure here rather than time on a GPU."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "bench" / "gpu.py"


def test_gpu_script_dry_run_reports_every_check(tmp_path):
    env = os.environ | {"OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert not [r for r in records if "error" in r]
    checks = [r.get("check") for r in records]
    assert checks == [None, "host_syncs_in_wcl_step", "wcl_vs_supervised_r50_224",
                      "wcl_vs_supervised_r50_224", "wcl_step_ours_vs_release",
                      "cifar_resnet18_epoch_data_on_gpu", "hybrid_device_share_224",
                      "blur_kernels", "multicrop_cost_r50", "bitwise_reruns_r50",
                      "fp16_vs_bf16_r50", "view_passes_r50"]  # fmt: skip
    for record in records[2:4]:
        assert record["wcl_images_per_s"] > 0 and record["supervised_images_per_s"] > 0
        # Step-time ratios agree with the images/s they come from.
        ratio = record["supervised_images_per_s"] / record["wcl_images_per_s"]
        assert math.isclose(record["cost_ratio"], ratio, rel_tol=1e-9)
        assert record["cost_ratio_same_crops"] > 0
    assert records[4]["speedup"] > 0
    assert records[5]["epoch_s"] > 0 and records[6]["augment_over_step"] > 0
    assert records[7]["depthwise_over_shifted"] > 0 and records[7]["max_diff"] < 1.3e-4
    assert records[8]["cost_ratio"] > 0 and records[8]["small_size"] == 14  # 32 * 96 / 224
    # On one CPU thread pool our steps are bitwise reproducible either way.
    assert records[9]["default_equal"] and records[9]["deterministic_equal"]
    fp16 = records[10]
    assert fp16["cost_ratio"] > 0 and fp16["parameters_finite"]
    # Each step that overflowed halved the scale from 65536 (1 warm-up + 1 timed step here).
    assert fp16["loss_scale"] in (65536.0, 32768.0, 16384.0)
    assert records[11]["speedup"] > 0


def test_a_failing_check_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """On the device every second counts: one broken check writes its error to gpu.jsonl
    and the next check still runs."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import importlib

    gpu = importlib.import_module("gpu")
    monkeypatch.setattr(gpu, "OUT_FILE", tmp_path / "gpu.jsonl")

    def broken_check(size):
        raise RuntimeError(f"no kernel for size {size}")

    gpu.attempt(broken_check, 7)
    gpu.report(check="next", value=1)
    lines = [json.loads(line) for line in (tmp_path / "gpu.jsonl").read_text().splitlines()]
    assert lines == [
        {"check": "broken_check", "error": "RuntimeError: no kernel for size 7"},
        {"check": "next", "value": 1},
    ]
