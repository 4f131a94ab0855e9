"""The language-model example runs as documented (tiny sizes: it must not rot; learning
itself is shown by the full run recorded in the README)."""

import pathlib
import re
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_char_language_model_runs_and_reports_memory_and_bits_per_character():
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "char_language_model.py"),
         "--num-steps", "200", "--train-steps", "3", "--corpus-chars", "100000",
         "--held-out-chars", "10000", "--sample-chars", "40", "--budget", "5%",
         "--threshold", "10"], capture_output=True, text=True, timeout=600)
    output = completed.stdout
    assert completed.returncode == 0, output[-3000:] + completed.stderr[-3000:]
    assert "Plan: msm" in output
    fused = re.search(r"fused MemoryEfficientRNN, budget 5%\s*:\s*([0-9.]+)MiB", output)
    standard = re.search(r"standard keras.layers.RNN \+ Dense :\s*([0-9.]+)MiB", output)
    assert fused and standard, output
    # The fused model's step holds no (batch, T, units) output and no logits sequence.
    assert float(fused.group(1)) < 0.5 * float(standard.group(1))
    losses = re.search(r"same loss from the same weights: fused ([0-9.]+), standard ([0-9.]+)",
                       output)
    assert losses and abs(float(losses.group(1)) - float(losses.group(2))) < 1e-4
    assert re.search(r"Held-out: [0-9.]+ bits per character \(unigram baseline [0-9.]+", output)
    assert "Sampled (40 characters" in output
