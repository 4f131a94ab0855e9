"""Command line: plan a schedule and see what a memory budget costs.

    python -m tf_membptt plan --num-steps 1000 --budget 5% --alpha 2 [--strategy msm]
                              [--plot curve.png] [--plot-points 15]

Prints the plan's summary (forward evaluations per step, peak memory in slots and as a
percentage of standard BPTT's, predicted time ratio). ``--plot`` also draws the cost–memory
curves of the strategies, the picture to look at when choosing a budget.

This module plans without TensorFlow: only the planner (pure Python + numpy) is imported,
and matplotlib only when a plot is asked for.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import sys
from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

from tf_membptt.budget import Budget, budget_argument, parse_budget
from tf_membptt.planner import minimum_memory_slots, plan
from tf_membptt.schedule import STRATEGIES, Plan

# Strategies whose cost depends on the budget: drawn as curves. `chen` and `full` are fixed
# schedules: drawn as single points.
_CURVE_STRATEGIES = ("hsm", "ism", "msm")
_DEFAULT_PLOT_POINTS = 15
# Backward step cost in forward steps, as assumed by `Plan.time_ratio`'s default.
_BACKWARD_COST = 2.0


class _OneLineErrorParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fraction(text: str, flag: str) -> Fraction:
    try:
        value = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{flag} must be a number. Received: {text!r}")
    return value


def _parse_alpha(text: str) -> Fraction:
    # Kept exact (a Fraction) so that `fraction * alpha * T` is floored without rounding
    # error: 0.29 * 100 is 28.999... in floating point but the budget is 29 slots.
    return _fraction(text, "--alpha")


def _parse_budget(text: str) -> Budget:
    """``--budget``, read as the layer reads `memory_budget` (`budget.budget_argument`)."""
    try:
        budget = parse_budget(budget_argument(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if budget.kind == "bytes":
        raise argparse.ArgumentTypeError(
            "a budget in bytes needs the bytes of one hidden state, which only the layer "
            "knows (its cell, batch size and dtype); here give a percentage (5%), a fraction "
            f"(0.05) or slots:N. Received: {text!r}")
    return budget


def _build_parser() -> Tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The top-level parser and its `plan` subcommand's parser."""
    parser = _OneLineErrorParser(
        prog="python -m tf_membptt",
        description="Memory-efficient backpropagation through time: plan a checkpointing "
                    "schedule within a memory budget.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     parser_class=_OneLineErrorParser)
    plan_parser = commands.add_parser(
        "plan", help="plan a schedule and print its cost",
        description="Plan a schedule for a sequence of NUM_STEPS steps and print its cost. "
                    "Memory is counted in hidden-state units (slots): a stored hidden state "
                    "is 1 slot, a stored internal state ALPHA slots, h_0 always 1 slot. "
                    "Standard BPTT needs about ALPHA * NUM_STEPS slots.")
    plan_parser.add_argument("--num-steps", type=int, required=True,
                             help="sequence length T")
    plan_parser.add_argument(
        "--budget", type=_parse_budget, default=_parse_budget("5%"),
        help="memory budget: a percentage of standard BPTT's memory (5%%), the same as a "
             "fraction (0.05), giving floor(fraction * ALPHA * T) slots; or an explicit "
             "slot count (slots:100). Default: 5%%")
    plan_parser.add_argument("--alpha", type=_parse_alpha, default=Fraction(2),
                             help="size of an internal state in hidden-state units (>= 1; "
                                  "default 2)")
    plan_parser.add_argument("--strategy", choices=STRATEGIES, default="msm",
                             help="msm (mixed, default), hsm (hidden states only, Revolve), "
                                  "ism (internal states only), full (standard BPTT), chen "
                                  "(sqrt(T) segments)")
    plan_parser.add_argument("--plot", metavar="PNG",
                             help="also write the cost-memory curves of hsm, ism, msm and "
                                  "chen to this PNG file (needs matplotlib)")
    plan_parser.add_argument("--plot-points", type=int, default=_DEFAULT_PLOT_POINTS,
                             metavar="N",
                             help=f"budgets sampled per curve, log-spaced from the minimum "
                                  f"to 100%% (default {_DEFAULT_PLOT_POINTS}; each is one "
                                  f"planner run)")
    return parser, plan_parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser, plan_parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _run_plan(args)
    except ValueError as error:
        # Bad values that only the planner can judge (num_steps < 1, alpha < 1, a budget
        # below the least feasible one): one line, like argparse's own errors.
        plan_parser.error(str(error))
    except _PlotError as error:
        plan_parser.error(str(error))
    return 2  # pragma: no cover - error() exits


class _PlotError(Exception):
    """The plot could not be made (matplotlib missing, file not writable)."""


def _memory_slots(budget: Budget, num_steps: int, alpha: Fraction) -> float:
    # The layer's own conversion (`Budget.slots`), so a budget plans the same here.
    return budget.slots(num_steps=num_steps, alpha=float(alpha), hidden_bytes=None)


def _describe_budget(budget: Budget, num_steps: int, alpha: Fraction, memory_slots) -> str:
    standard = alpha * num_steps
    if budget.kind == "slots":
        return (f"Budget: {_fmt(memory_slots)} slots "
                f"({100 * float(memory_slots / standard):.2f}% of standard BPTT's "
                f"{_fmt(float(standard))})")
    if budget.kind == "unlimited":
        return (f"Budget: none (standard BPTT's {_fmt(float(standard))} slots and h_0) -> "
                f"memory_slots={_fmt(memory_slots)}")
    return (f"Budget: {_fmt(round(100 * budget.value, 12))}% of standard BPTT's "
            f"{_fmt(float(standard))} slots -> memory_slots={_fmt(memory_slots)}")


def _run_plan(args) -> int:
    num_steps, alpha = args.num_steps, args.alpha
    if args.plot_points < 2:
        raise ValueError(f"Argument `--plot-points` must be >= 2. "
                         f"Received: --plot-points={args.plot_points}")
    if num_steps < 1:
        raise ValueError(f"Argument `--num-steps` must be >= 1. "
                         f"Received: --num-steps={num_steps}")
    if args.plot:
        # Fail before the (possibly long) planning, not after it.
        _check_plot_possible(args.plot)
    if alpha < 1:
        # Checked before the budget, which depends on alpha.
        raise ValueError(f"Argument `--alpha` must be >= 1. Received: --alpha={_fmt(alpha)}")
    memory_slots = _memory_slots(args.budget, num_steps, alpha)
    if args.budget.kind == "fraction":
        minimum = minimum_memory_slots(num_steps, args.strategy, float(alpha))
        if memory_slots < minimum:
            raise ValueError(
                f"--budget {_fmt(round(100 * args.budget.value, 12))}% gives "
                f"memory_slots={_fmt(memory_slots)} "
                f"(floor({_fmt(args.budget.value)} * alpha={_fmt(alpha)} * T={num_steps})), "
                f"below the minimum of {_fmt(minimum)} slot{'' if minimum == 1 else 's'} "
                f"for strategy {args.strategy!r}; use a larger budget or slots:N")
    chosen = plan(num_steps, memory_slots, strategy=args.strategy, alpha=float(alpha))
    print(_describe_budget(args.budget, num_steps, alpha, memory_slots))
    print(chosen.describe())
    if args.plot:
        _write_plot(args.plot, chosen, args.plot_points)
        print(f"Wrote the cost-memory curves to {args.plot}")
    return 0


# --------------------------------------------------------------------------------------
# The cost-memory plot
# --------------------------------------------------------------------------------------
def _sample_budgets(num_steps: int, alpha: float, points: int) -> List[int]:
    """Integer budgets, log-spaced from 1 slot (h_0 alone) to 100% of standard BPTT."""
    top = max(1, math.floor(alpha * num_steps))
    if top == 1:
        return [1]
    budgets = {max(1, min(top, round(math.exp(math.log(top) * i / (points - 1)))))
               for i in range(points)}
    return sorted(budgets)


def _plan_point(task) -> Tuple[str, float, float]:
    num_steps, memory_slots, strategy, alpha = task
    result = plan(num_steps, memory_slots, strategy=strategy, alpha=alpha)
    return strategy, memory_slots, result.forward_evals_per_step


def _plan_points(tasks) -> List[Tuple[str, float, float]]:
    # Plans are independent: spread them over the CPUs. Largest budgets first, as they take
    # longest, so that the pool is not left waiting on one slow plan at the end.
    tasks = sorted(tasks, key=lambda task: -task[1])
    workers = min(len(tasks), os.cpu_count() or 1)
    if workers > 1:
        try:
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
                return list(pool.map(_plan_point, tasks))
        except (OSError, concurrent.futures.process.BrokenProcessPool):
            pass  # no subprocesses here (sandbox, limits): plan in this process instead
    return [_plan_point(task) for task in tasks]


def _check_plot_possible(path: str) -> None:
    try:
        import matplotlib  # noqa: F401  (only checking that it is there)
    except ImportError:
        raise _PlotError("--plot needs matplotlib: pip install matplotlib "
                         "(or pip install 'tf_membptt[plot]')") from None
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise _PlotError(f"cannot write --plot {path!r}: folder {folder!r} does not exist or "
                         f"is not writable")


def _write_plot(path: str, chosen: Plan, points: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    num_steps, alpha = chosen.num_steps, chosen.alpha
    standard = alpha * num_steps
    budgets = _sample_budgets(num_steps, alpha, points)
    tasks = [(num_steps, b, s, alpha) for s in _CURVE_STRATEGIES for b in budgets]
    print(f"Planning {len(tasks)} schedules for the plot ({len(budgets)} budgets x "
          f"{len(_CURVE_STRATEGIES)} strategies)...", file=sys.stderr, flush=True)
    curves = {s: [] for s in _CURVE_STRATEGIES}
    for strategy, memory_slots, per_step in _plan_points(tasks):
        curves[strategy].append((memory_slots, per_step))
    if chosen.strategy in curves:  # put the chosen plan on its own curve
        curves[chosen.strategy].append((chosen.memory_slots, chosen.forward_evals_per_step))

    figure = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    styles = {"hsm": ("tab:blue", "o", "hsm: hidden states (Revolve)"),
              "ism": ("tab:orange", "s", "ism: internal states"),
              "msm": ("tab:green", "^", "msm: mixed (optimal)")}
    for strategy in _CURVE_STRATEGIES:
        color, marker, label = styles[strategy]
        xs, ys = zip(*sorted(set(curves[strategy])))
        axes.plot([100 * x / standard for x in xs], ys, color=color, marker=marker,
                  markersize=4, label=label)
    chen = plan(num_steps, minimum_memory_slots(num_steps, "chen", alpha), strategy="chen",
                alpha=alpha)
    # Drawn above the chosen plan's star: at small budgets the two often nearly coincide.
    axes.plot([100 * chen.memory_fraction], [chen.forward_evals_per_step], "D",
              color="tab:red", markeredgecolor="black", zorder=6,
              label=f"chen: sqrt(T) segments (recompute_grad), "
                    f"{100 * chen.memory_fraction:.2g}% memory")
    axes.plot([100 * (1 + standard) / standard], [1.0], "P", color="black",
              label="standard BPTT")
    axes.plot([100 * chosen.memory_slots / standard], [chosen.forward_evals_per_step], "*",
              color="gold", markeredgecolor="black", markersize=16, zorder=5,
              label=(f"chosen: {chosen.strategy}, {_fmt(chosen.memory_slots)} slots -> "
                     f"{chosen.forward_evals_per_step:.3f}/step, "
                     f"{chosen.time_ratio():.3f}x time"))
    plain_numbers = FuncFormatter(lambda value, _: f"{value:g}")
    # Both axes logarithmic: budgets are log-spaced, and the smallest budgets cost
    # O(T) evaluations per step, which would flatten the useful 1-3 range on a linear axis.
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(plain_numbers)
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("memory budget (% of standard BPTT's memory)")
    axes.set_ylabel("forward evaluations per step")
    # The predicted time ratio is an affine function of evaluations per step, so it gets
    # its own axis on the right instead of a second set of curves.
    scale = 1.0 + _BACKWARD_COST
    secondary = axes.secondary_yaxis(
        "right", functions=(lambda e: (e + _BACKWARD_COST) / scale,
                            lambda r: r * scale - _BACKWARD_COST))
    secondary.yaxis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0)))
    secondary.yaxis.set_major_formatter(plain_numbers)
    secondary.yaxis.set_minor_formatter(NullFormatter())
    secondary.set_ylabel(f"predicted time vs standard BPTT (backward = "
                         f"{_fmt(_BACKWARD_COST)} forward steps)")
    axes.set_title(f"Cost of a memory budget: T={num_steps}, alpha={_fmt(alpha)}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as error:
        raise _PlotError(f"cannot write --plot {path!r}: {error.strerror or error}") from None


def _fmt(value) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:g}"
