"""Benchmarks that cannot rot: the GPU benchmark runs on CPU at tiny sizes (``--smoke``)
between the times a GPU is at hand, and bench_speed renders its tables from a run's JSON."""

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


def test_speed_table_gives_per_round_ratios_and_quartiles(tmp_path):
    # bench_speed --render rewrites the tables of a run's JSON: here a run of 5 rounds whose
    # per-round ratios at 5% are 1.1, 1.2, 1.3, 1.5 and 2.0 (median 1.3, quartiles 1.2 and
    # 1.5), while the ratio of the medians is 1.5 / 1.0 (keras.layers.RNN's median).
    keras_times = [1.0, 2.0, 0.5, 1.0, 1.0]
    entry = {
        "config": "lstm32", "label": "LSTMCell(32)", "mode": "graph", "T": 10, "batch": 2,
        "features": 3, "rounds": 5, "beta_measured": 2.0,
        "times_s": {"keras.layers.RNN": keras_times,
                    "keras forward": [0.25, 0.5, 0.125, 0.25, 0.25],
                    "budget 100%": keras_times,
                    "budget 5%": [1.1, 2.4, 0.65, 1.5, 2.0]},
        "medians_s": {"keras.layers.RNN": 1.0, "keras forward": 0.25, "budget 100%": 1.0,
                      "budget 5%": 1.5},
        "budgets": {"100%": {"ratio": 1.0, "predicted": 1.0, "forward_evals": 10},
                    "5%": {"ratio": 1.5, "predicted": 1.3, "forward_evals": 19}},
    }
    payload = {"machine": {"date": "2026-12-01", "cpus": 2, "processor": "x86_64",
                           "tensorflow": "t", "keras": "k", "devices": ["CPU"]},
               "args": {"num_steps": 10, "rounds": 5, "quick": False},
               "results": [entry]}
    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps(payload))
    out = tmp_path / "out"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_speed.py"), "--render",
         str(run_json), "--out-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    table = (out / "run.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| LSTMCell(32)"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[4:10] == ["1.00x", "1.00x (1.00-1.00)", "1.00x", "1.50x",
                           "1.30x (1.20-1.50)", "1.30x"]
