"""The GPU benchmark runs on CPU at tiny sizes (``--smoke``) so that it cannot rot between
the times a GPU is at hand."""

import json
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_benchmark_smoke_run_writes_its_tables(tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_gpu.py"), "--smoke",
         "--lengths", "40", "--rounds", "1", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert report["meta"]["device"] in ("CPU:0", "GPU:0")
    assert report["meta"]["args"]["lengths"] == "40"
    modes = {entry["mode"] for entry in report["results"]}
    assert modes == {"graph", "xla"}
    for entry in report["results"]:
        assert entry["T"] == 40
        assert set(entry["methods"]) == {"keras.layers.RNN", "cuDNN", "budget 5%",
                                         "budget 20%", "budget 100%"}, entry["skipped"]
        for method, measured in entry["methods"].items():
            assert len(measured["times_s"]) == 1 and measured["median_s"] > 0
            if method.startswith("budget"):
                # The same weights in every method: the planned gradients are BPTT's.
                assert measured["grad_rel_err"] < 1e-5, (method, measured)
                assert measured["forward_evals"] >= 40
    table = (tmp_path / "gpu_smoke.md").read_text()
    assert "| graph | 40 | budget 5% |" in table and "| xla | 40 | cuDNN |" in table
