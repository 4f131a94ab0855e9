"""Tests of the command line, run as users run it: ``python -m tf_membptt ...``."""

import os
import pathlib
import re
import struct
import subprocess
import sys
import textwrap

import pytest

from tf_membptt.budget import budget_argument, parse_budget

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(*args, code=None):
    """Run ``python -m tf_membptt ARGS`` (or ``python -c CODE``) from the repository root."""
    command = [sys.executable, "-c", code] if code else [sys.executable, "-m", "tf_membptt"]
    environment = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep
                       + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=environment, timeout=300)


def test_headline_plan():
    result = run_cli("plan", "--num-steps", 1000, "--budget", "5%", "--alpha", 2)
    assert result.returncode == 0, result.stderr
    assert "memory_slots=100" in result.stdout
    assert "1950 (1.950 per step" in result.stdout
    assert "1.317x standard BPTT" in result.stdout
    # The optimal plan stores h_0 and 49 internal states: 99 of the 100 slots.
    assert "99 slots (4.95% of standard BPTT's 2000)" in result.stdout


def forward_evaluations_line(stdout):
    return next(line for line in stdout.splitlines() if "forward evaluations" in line)


@pytest.mark.parametrize("budget", ["0.05", "slots:40", "5 %"])
def test_budget_forms_agree(budget):
    # 5% of alpha * T = 2 * 400 = 800 slots is 40 slots, however it is written.
    reference = run_cli("plan", "--num-steps", 400, "--budget", "5%")
    result = run_cli("plan", "--num-steps", 400, "--budget", budget)
    assert result.returncode == 0, result.stderr
    assert "memory_slots=40," in result.stdout
    assert forward_evaluations_line(result.stdout) == forward_evaluations_line(reference.stdout)


def test_fraction_budget_is_floored_exactly():
    # 0.29 * 1 * 100 is 28.999... in floating point; the budget is 29 slots.
    result = run_cli("plan", "--num-steps", 100, "--budget", "29%", "--alpha", 1)
    assert result.returncode == 0, result.stderr
    assert "memory_slots=29," in result.stdout


def test_strategy_flag_is_used():
    result = run_cli("plan", "--num-steps", 100, "--budget", "5%", "--strategy", "hsm")
    assert result.returncode == 0, result.stderr
    assert "Plan: hsm (exact)" in result.stdout
    assert "0 internal states" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--budget", "120%"], "--budget"),
    (["--budget", "0"], "--budget"),
    (["--budget", "abc"], "--budget"),
    (["--budget", "slots:-3"], "--budget"),
    (["--budget", "0.01%"], "below the minimum of 1 slot"),
    (["--budget", "slots:0.5"], "at least 1 (h_0 is always held)"),
    (["--budget", "64MiB"], "a budget in bytes needs the bytes of one hidden state"),
    (["--strategy", "foo"], "invalid choice: 'foo'"),
    (["--strategy", "full", "--budget", "100%"], "minimum of 201 slots"),
    (["--alpha", "0.5"], "Received: --alpha=0.5"),
    (["--alpha", "nan"], "--alpha must be a number"),
    (["--num-steps", "0"], "Received: --num-steps=0"),
    (["--num-steps", "abc"], "--num-steps"),
    (["--plot-points", "1"], "--plot-points"),
])
def test_bad_values_give_one_line_error_and_status_2(args, message):
    arguments = {"--num-steps": "100"}
    for flag, value in zip(args[::2], args[1::2]):
        arguments[flag] = value
    result = run_cli("plan", *[item for pair in arguments.items() for item in pair])
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_missing_num_steps_is_an_error():
    result = run_cli("plan", "--budget", "5%")
    assert result.returncode == 2
    assert "--num-steps" in result.stderr


def test_plot_writes_png(tmp_path):
    path = tmp_path / "curve.png"
    result = run_cli("plan", "--num-steps", 60, "--budget", "10%", "--plot", path,
                     "--plot-points", 6)
    assert result.returncode == 0, result.stderr
    assert f"Wrote the cost-memory curves to {path}" in result.stdout
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    # IHDR: the first chunk, holding width and height (the figure is 8 x 5 in at 120 dpi).
    length, chunk = struct.unpack(">I4s", data[8:16])
    width, height = struct.unpack(">II", data[16:24])
    assert chunk == b"IHDR" and length == 13
    assert (width, height) == (960, 600)
    assert len(data) > 20_000  # curves, labels and legend, not an empty canvas


def test_plot_to_unwritable_path_is_one_line_error(tmp_path):
    result = run_cli("plan", "--num-steps", 20, "--plot", tmp_path / "missing" / "x.png",
                     "--plot-points", 3)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # checked before planning: no progress line
    assert "cannot write --plot" in lines[0]


def test_plot_without_matplotlib_says_so(tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.modules["matplotlib"] = None  # makes `import matplotlib...` raise ImportError
        from tf_membptt.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    result = run_cli("plan", "--num-steps", 20, "--plot", tmp_path / "x.png", code=code)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--plot needs matplotlib" in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_planning_from_the_cli_does_not_import_tensorflow():
    code = textwrap.dedent("""
        import sys
        from tf_membptt.cli import main
        status = main(["plan", "--num-steps", "50"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
        print("HEAVY", heavy)
        sys.exit(status)
    """)
    result = run_cli(code=code)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_no_command_prints_help_and_fails():
    result = run_cli()
    assert result.returncode == 2
    assert "plan" in result.stderr


def test_no_budget_plans_standard_bptt():
    # "none" is memory_budget=None: every internal state stored, nothing recomputed.
    result = run_cli("plan", "--num-steps", 50, "--budget", "none", "--alpha", 2)
    assert result.returncode == 0, result.stderr
    assert "memory_slots=101" in result.stdout
    assert forward_evaluations_line(result.stdout).strip().startswith("forward evaluations : 50 (")


@pytest.mark.parametrize("text,expected", [
    ("0.05", 0.05), (" 1 ", 1.0), ("1.0", 1.0), ("5%", "5%"), ("67108864", 67108864),
    ("64MiB", "64MiB"), ("1.5GB", "1.5GB"), ("slots:40", "slots:40"), ("none", None),
    ("None", None),
])
def test_budget_argument_reads_text_as_the_layer_reads_values(text, expected):
    value = budget_argument(text)
    assert value == expected and type(value) is type(expected)
    # The same Budget as the value the layer would be given.
    assert parse_budget(value) == parse_budget(expected)


@pytest.mark.parametrize("text,message", [
    ("0", "must be in (0, 1]"), ("1.5", "must be in (0, 1]"), ("-3", "must be in (0, 1]"),
    ("abc", "is not a recognised budget"), ("120%", "(0%, 100%]"),
    ("slots:0", "at least 1"),
])
def test_budget_argument_refuses_bad_text_naming_it(text, message):
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        budget_argument(text)
    assert "Received: memory_budget=" in str(caught.value)


def test_budget_argument_needs_text():
    with pytest.raises(TypeError, match=r"Received: text=0\.05"):
        budget_argument(0.05)
