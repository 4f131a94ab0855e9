"""Planner benchmarks: planning time, planner memory, approximate vs exact cost.

    python benchmarks/bench_planner.py            # full run (several minutes)
    python benchmarks/bench_planner.py --quick    # T=1000 only (under a minute)

Each timing case measures, separately, `plan(...)`, then `op_table()` and `describe()` on
the plan it returned: the three costs a layer pays when it plans at trace time (the
executor then loads the op table).

Writes ``benchmarks/results/planner.json`` and ``benchmarks/results/planner.md``.

Every case runs in a fresh subprocess, so that

* its peak memory (``ru_maxrss``) is the planner's own, measured against the process's
  footprint right after the imports;
* a case that takes too long is stopped (``--case-timeout``) and reported as such;
* a case that needs more memory than ``--memory-limit-gb`` fails with ``MemoryError``
  inside its own process instead of exhausting the machine.

Timings are medians over repeats with a fresh plan cache (``_cached_plan.cache_clear()``)
before each, so the cache never answers. The approximate-vs-exact table computes the
exact DP with ``tf_membptt.planner._EXACT_WORK_LIMIT`` raised to infinity, and forces the
approximate (chained) method with ``_EXACT_WORK_LIMIT = 0``; for T <= 5000 its chunk
tables are also cut to a tenth of the exact DP's work (``_CHUNK_WORK_LIMIT``), so that the
sequence really is split into chunks (with the default limits it would be one chunk).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# A case's repeats stop once this much time has been spent (after the first run), so that
# slow cases get fewer repeats instead of making the benchmark take an hour.
_REPEAT_TIME_BUDGET_S = 60.0


def _import_planner():
    # The checkout this script belongs to, even where another copy of the package is
    # installed (as the other benchmarks do): it measures the planner beside it.
    sys.path.insert(0, str(REPO_ROOT))
    import tf_membptt.planner as planner
    return planner


def _maxrss_mb() -> float:
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1.0 / 1024 if sys.platform != "darwin" else 1.0 / (1024 * 1024)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# --------------------------------------------------------------------------------------
# Child side: one case, measured in its own process
# --------------------------------------------------------------------------------------
def _child_timing(spec: dict) -> dict:
    planner = _import_planner()
    baseline_mb = _maxrss_mb()
    times, table_times, describe_times, result = [], [], [], None
    started = time.perf_counter()
    for _ in range(spec["repeats"]):
        planner._cached_plan.cache_clear()
        tic = time.perf_counter()
        result = planner.plan(spec["num_steps"], spec["memory_slots"],
                              strategy=spec["strategy"], alpha=spec["alpha"])
        planned = time.perf_counter()
        table = result.op_table()
        tabled = time.perf_counter()
        result.describe()
        described = time.perf_counter()
        times.append(planned - tic)
        table_times.append(tabled - planned)
        describe_times.append(described - tabled)
        if time.perf_counter() - started > _REPEAT_TIME_BUDGET_S:
            break
    totals = [sum(parts) for parts in zip(times, table_times, describe_times)]
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "op_table_times_s": table_times,
        "op_table_median_s": statistics.median(table_times),
        "describe_times_s": describe_times,
        "describe_median_s": statistics.median(describe_times),
        "total_median_s": statistics.median(totals),
        "method": result.method,
        "forward_evals": result.forward_evals,
        "forward_evals_per_step": result.forward_evals_per_step,
        "time_ratio": result.time_ratio(),
        "peak_memory": result.peak_memory,
        "num_ops": len(table),
        "baseline_rss_mb": baseline_mb,
        "peak_rss_mb": _maxrss_mb(),
    }


def _child_compare(spec: dict) -> dict:
    planner = _import_planner()
    args = (spec["num_steps"], spec["memory_slots"])
    kwargs = dict(strategy=spec["strategy"], alpha=spec["alpha"])
    planner._cached_plan.cache_clear()
    planner._EXACT_WORK_LIMIT = math.inf  # the exact DP, whatever its size
    tic = time.perf_counter()
    exact = planner.plan(*args, **kwargs)
    exact_s = time.perf_counter() - tic
    planner._cached_plan.cache_clear()
    planner._EXACT_WORK_LIMIT = 0  # force the approximate (chained) method
    if spec.get("chunk_work_fraction"):
        a, q = planner.alpha_units(spec["alpha"])
        work = planner._dp_work(spec["num_steps"], int(spec["memory_slots"] * q), a, q,
                                spec["strategy"])[0]
        planner._CHUNK_WORK_LIMIT = work * spec["chunk_work_fraction"]
    tic = time.perf_counter()
    approximate = planner.plan(*args, **kwargs)
    approximate_s = time.perf_counter() - tic
    # `plan` builds the O(T) lower-bound schedule, where one exists, before any chain.
    a, q = planner.alpha_units(spec["alpha"])
    budget = int(math.floor(spec["memory_slots"] * q + 1e-9))
    direct = planner._boundary_chunks(spec["num_steps"], budget, a, q, spec["strategy"])
    return {
        "approximate_route": "chained" if direct is None else "lower bound",
        "exact_method": exact.method,
        "approximate_method": approximate.method,
        "exact_forward_evals": exact.forward_evals,
        "approximate_forward_evals": approximate.forward_evals,
        "excess_evals": approximate.forward_evals - exact.forward_evals,
        "excess_percent": 100.0 * (approximate.forward_evals - exact.forward_evals)
        / exact.forward_evals,
        "exact_s": exact_s,
        "approximate_s": approximate_s,
    }


def _child_main(kind: str, spec_json: str, memory_limit_gb: float) -> None:
    if memory_limit_gb > 0:
        limit = int(memory_limit_gb * 1024 ** 3)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    spec = json.loads(spec_json)
    try:
        outcome = (_child_timing if kind == "timing" else _child_compare)(spec)
        outcome["status"] = "ok"
    except MemoryError:
        outcome = {"status": "memory_error",
                   "detail": f"MemoryError under a {memory_limit_gb:g} GB address-space limit",
                   "peak_rss_mb": _maxrss_mb()}
    print("RESULT " + json.dumps(outcome))


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------
def _run_child(kind: str, spec: dict, timeout_s: float, memory_limit_gb: float) -> dict:
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", kind,
               json.dumps(spec), "--memory-limit-gb", str(memory_limit_gb)]
    tic = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**spec, "status": "timeout",
                "detail": f"stopped after {timeout_s:g} s (--case-timeout)"}
    wall = time.perf_counter() - tic
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        tail = (completed.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {**spec, "status": "error", "detail": tail[:300], "wall_s": wall}
    return {**spec, **json.loads(lines[-1][len("RESULT "):]), "wall_s": wall}


def _budget_slots(fraction: float, num_steps: int, alpha: float) -> int:
    # As the CLI and the docs define a fractional budget: floor(fraction * alpha * T).
    return max(1, math.floor(fraction * alpha * num_steps + 1e-9))


def _spec(num_steps, fraction, strategy="msm", alpha=2.0, repeats=1):
    return {"num_steps": num_steps, "budget_percent": 100 * fraction,
            "memory_slots": _budget_slots(fraction, num_steps, alpha),
            "strategy": strategy, "alpha": alpha, "repeats": repeats}


def _timing_specs(quick: bool, skip_100k: bool, skip_1m: bool):
    fractions = (0.01, 0.05, 0.2) if quick else (0.01, 0.05, 0.2, 0.5, 1.0)
    specs = [_spec(1000, f, repeats=3 if quick else 5) for f in fractions]
    if not quick:
        specs.append(_spec(10_000, 0.05, repeats=3))
        if not skip_100k:
            specs.append(_spec(100_000, 0.05, repeats=3))
        if not skip_1m:
            specs.append(_spec(1_000_000, 0.05, repeats=3))
    return specs


def _comparison_specs(quick: bool):
    sizes = (1000,) if quick else (1000, 2000, 5000)
    fractions = (0.05,) if quick else (0.01, 0.05, 0.2)
    strategies = ("msm",) if quick else ("msm", "hsm", "ism")
    specs = []
    for t in sizes:
        for f in fractions:
            for s in strategies:
                if t == 5000 and f == 0.2 and s != "msm":
                    continue  # ~1 min of exact DP each: msm only
                # Chunk tables cut to a tenth of the exact work: really chained.
                specs.append({**_spec(t, f, strategy=s), "chunk_work_fraction": 0.1})
    if not quick:
        # The approximate method as `plan` runs it by default, against the exact DP.
        specs.append(_spec(10_000, 0.05))
    return specs


def _environment(planner_file: str) -> dict:
    source = pathlib.Path(planner_file).read_bytes()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": __import__("numpy").__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "planner_file": planner_file,
        "planner_sha256": hashlib.sha256(source).hexdigest(),
    }


def _format_case(case: dict) -> str:
    return (f"T={case['num_steps']}, {case['budget_percent']:g}% "
            f"({case['memory_slots']} slots), {case['strategy']}, alpha={case['alpha']:g}")


def _markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# Planner benchmark",
        "",
        f"Run {env['date']} ({'quick' if report['quick'] else 'full'} run): Python "
        f"{env['python']}, numpy {env['numpy']}, {env['cpu_count']} CPUs, load average "
        f"{env['load_average_1min']:.2f} at the start; planner `{env['planner_file']}` "
        f"(sha256 {env['planner_sha256'][:12]}).",
        "",
        "Budgets are fractions of standard BPTT's memory, `floor(fraction * alpha * T)` "
        "slots. Times are medians over fresh-cache repeats; memory is the planning process's "
        "peak RSS minus its RSS after the imports.",
        "",
        "## Planning time and memory (msm)",
        "",
        "`plan`, `op_table()` and `describe()` are timed separately (medians); the total is "
        "the median of their sum per run.",
        "",
        "| T | budget | slots | method | plan (s) | op_table (s) | describe (s) | total (s) "
        "| runs | ops | forward evals / step | time ratio | planner memory (MB) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["timings"]:
        if case["status"] == "ok":
            memory = case["peak_rss_mb"] - case["baseline_rss_mb"]
            lines.append(
                f"| {case['num_steps']} | {case['budget_percent']:g}% | {case['memory_slots']} "
                f"| {case['method']} | {case['median_s']:.3f} "
                f"| {case['op_table_median_s']:.4f} | {case['describe_median_s']:.4f} "
                f"| {case['total_median_s']:.3f} | {len(case['times_s'])} "
                f"| {case['num_ops']} | {case['forward_evals_per_step']:.3f} "
                f"| {case['time_ratio']:.3f} | {memory:.0f} | ok |")
        else:
            lines.append(
                f"| {case['num_steps']} | {case['budget_percent']:g}% | {case['memory_slots']} "
                f"| - | - | - | - | - | - | - | - | - | - | {case['status']}: "
                f"{case.get('detail', '')} |")
    load = env.get("load_average_1min")
    if load is not None and env.get("cpu_count") and load > env["cpu_count"]:
        lines += ["", f"Note: the machine was shared (load average {load:.2f} on "
                      f"{env['cpu_count']} CPUs at the start), so times are inflated and "
                      f"noisy; the first run of a case is often the slowest."]
    for note in report.get("notes", []):
        lines += ["", note]
    lines += [
        "",
        "## Approximate vs exact forward evaluations",
        "",
        "The approximate (chained) method is forced with `_EXACT_WORK_LIMIT = 0`; for "
        "T <= 5000 its chunk tables are cut to a tenth of the exact DP's work "
        "(`_CHUNK_WORK_LIMIT`) so that every case is really split into chunks; T=10,000 "
        "runs it with its default limits, as `plan` does. The exact DP is the optimum of "
        "the game.",
        "",
        "Forcing the approximate method does not force a chain: where a schedule meeting "
        "the lower bound exists (msm and ism at most budgets from a few percent up), `plan` "
        "builds it first, and the route column says so. For the chain where `plan` really "
        "uses it, see tests/test_planner_large.py, \"(d)\": it costs 0 to 1.19% more than "
        "the optimum there.",
        "",
        "| T | budget | slots | strategy | route | exact | approximate | excess "
        "| exact time (s) | approximate time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in report["comparison"]:
        if case["status"] != "ok":
            lines.append(f"| {case['num_steps']} | {case['budget_percent']:g}% "
                         f"| {case['memory_slots']} | {case['strategy']} | - | - | - | - | - "
                         f"| {case['status']}: {case.get('detail', '')} |")
            continue
        lines.append(
            f"| {case['num_steps']} | {case['budget_percent']:g}% | {case['memory_slots']} "
            f"| {case['strategy']} | {case.get('approximate_route', '-')} "
            f"| {case['exact_forward_evals']} "
            f"| {case['approximate_forward_evals']} "
            f"| {case['excess_evals']} ({case['excess_percent']:.2f}%) "
            f"| {case['exact_s']:.3f} | {case['approximate_s']:.3f} |")
    compared = [case for case in report["comparison"] if case["status"] == "ok"]
    if compared:
        chained = sum(case.get("approximate_route") == "chained" for case in compared)
        lines += ["", f"Largest excess of the approximate method over the exact optimum: "
                      f"{max(case['excess_percent'] for case in compared):.2f}% over "
                      f"{len(compared)} cases ({chained} of them chained)."]
    large = [case for case in report["timings"]
             if case["num_steps"] >= 100_000 and case["status"] == "ok"]
    for case in large:
        lines += ["", f"T={case['num_steps']:,} at {case['budget_percent']:g}%: "
                      f"{case['method']}, plan {case['median_s']:.2f} s (with op_table and "
                      f"describe {case['total_median_s']:.2f} s), {case['num_ops']:,} ops, "
                      f"{case['forward_evals']} forward evaluations (lower bound "
                      f"2T - (m - 1) // alpha - 1 = "
                      f"{2 * case['num_steps'] - int((case['memory_slots'] - 1) // case['alpha']) - 1}"
                      f"), planner memory "
                      f"{case['peak_rss_mb'] - case['baseline_rss_mb']:.0f} MB."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="T=1000 at 1%%, 5%%, 20%% and a small comparison only")
    parser.add_argument("--skip-100k", action="store_true", help="leave out T=100,000")
    parser.add_argument("--skip-1m", action="store_true", help="leave out T=1,000,000")
    parser.add_argument("--case-timeout", type=float, default=300.0,
                        help="seconds before a case is stopped and reported (default 300)")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0,
                        help="address-space limit of each case's process (default 8; "
                             "0 for none)")
    parser.add_argument("--output-dir", type=pathlib.Path, default=RESULTS_DIR)
    parser.add_argument("--note", action="append", default=[],
                        help="a remark to record with the results (repeatable)")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child_main(args.child[0], args.child[1], args.memory_limit_gb)
        return 0

    planner = _import_planner()
    report = {"quick": args.quick, "environment": _environment(planner.__file__),
              "timings": [], "comparison": [], "notes": list(args.note)}
    for spec in _timing_specs(args.quick, args.skip_100k, args.skip_1m):
        print(f"timing  {_format_case(spec)} ...", file=sys.stderr, flush=True)
        case = _run_child("timing", spec, args.case_timeout, args.memory_limit_gb)
        print(f"        {case['status']} {case.get('median_s', '')}", file=sys.stderr)
        report["timings"].append(case)
    if args.skip_100k and not args.quick:
        report["notes"].append("T=100,000 was left out (--skip-100k).")
    if args.skip_1m and not args.quick:
        report["notes"].append("T=1,000,000 was left out (--skip-1m).")
    for spec in _comparison_specs(args.quick):
        print(f"compare {_format_case(spec)} ...", file=sys.stderr, flush=True)
        case = _run_child("compare", spec, args.case_timeout, args.memory_limit_gb)
        report["comparison"].append(case)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "planner.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output_dir / "planner.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
