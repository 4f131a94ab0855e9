"""Writes ``frozen_plans.npz``: the op tables and costs that `tf_membptt.planner.plan`
returned for a grid of cases, as a regression fixture (`tests/test_planner.py`,
"Frozen plans"). Emitting ops faster must not change a single op or cost.

    python tests/data/make_frozen_plans.py

Re-run it only when a change of the emitted schedules is intended (and say so in the
commit). The fixture holds:

* every op of small cases covering each route of `plan` (saturated budgets, the O(T)
  lower-bound schedules, the exact DP, ``full`` and ``chen``): T = 1..24, 28, 32, 36, 40,
  100, 173 and 300, budgets from the least one (from 3 slots at T >= 100) up to
  saturation, alpha 1, 1.5, 2, 3 and 4;
* every op of the chained method (`_chain_ops`) forced on T = 60..300 (``_EXACT_WORK_LIMIT
  = 0``, chunk tables cut to a tenth of the exact DP's work, as in test_planner_large.py),
  at budgets where `plan` really takes that route; and with chunk tables so short
  (``_CHUNK_SLACK = 1``, a hundredth of the work) that chunks run saturated beyond them;
* SHA-256 digests of the op tables of long default-route plans (T = 10,000 to 1,000,000),
  whose full tables would not fit a small fixture.
"""

import hashlib
import math
import pathlib
import sys

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

import tf_membptt.planner as planner  # noqa: E402

STRATEGIES = ("msm", "hsm", "ism", "full", "chen")
METHODS = ("exact", "approximate", "fixed")
ALPHAS = (1.0, 1.5, 2.0, 3.0, 4.0)
LENGTHS = tuple(range(1, 25)) + (28, 32, 36, 40, 100, 173, 300)
FRACTIONS = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
CHAIN_LENGTHS = (60, 100, 173, 300)
CHAIN_ALPHAS = (1.5, 2.0, 3.0)
CHAIN_BUDGETS = (2, 3, 5, 8, 13)
# Chained modes: 1 as test_planner_large.py forces it; 2 with chunk tables so short that
# chunks run saturated beyond them (`planner._saturated_run`).
CHAIN_MODES = {1: dict(work_fraction=0.1, slack=None, lengths=(60, 100, 173, 300),
                       budgets=(2, 3, 5, 8, 13)),
               2: dict(work_fraction=0.01, slack=1, lengths=(300, 700),
                       budgets=(24, 40, 60))}
# (T, memory_slots, strategy, alpha, slow): `slow` digests are checked only with -m slow.
DIGEST_CASES = (
    (4000, 190, "chen", 2.0, False),  # the least budget; segments of 64 steps
    (4000, 8001, "full", 2.0, False),
    (10_000, 1000, "hsm", 2.0, False),  # chained
    (20_000, 200, "ism", 2.0, False),  # chained
    (100_000, 10_000, "msm", 2.0, False),  # lower bound
    (20_000, 200, "msm", 2.0, True),  # chained
    (100_000, 15_000, "msm", 3.0, True),  # lower bound
    (100_000, 10_000, "hsm", 2.0, True),  # chained
    (1_000_000, 100_000, "msm", 2.0, True),  # lower bound
)


def table_digest(table) -> str:
    return hashlib.sha256(np.ascontiguousarray(table, dtype="<i4").tobytes()).hexdigest()


def default_cases():
    cases = []
    for T in LENGTHS:
        for alpha in ALPHAS:
            for strategy in ("full", "chen"):
                cases.append((T, planner.minimum_memory_slots(T, strategy, alpha), strategy,
                              alpha))
            # Budgets of 1 to 2 slots recompute triangles (quadratic op lists): short T only.
            budgets = {3.0, float(1 + math.ceil(alpha * T))}
            if T <= 40:
                budgets |= {1.0, 1.5, 2.0}
            budgets |= {float(max(1, math.floor(f * alpha * T))) for f in FRACTIONS}
            for strategy in ("msm", "hsm", "ism"):
                cases += [(T, m, strategy, alpha) for m in sorted(budgets)]
    return cases


def chain_route(T, memory_slots, strategy, alpha) -> bool:
    """Whether `plan` takes the chained route once `_EXACT_WORK_LIMIT` is 0."""
    a, q = planner.alpha_units(alpha)
    budget = int(math.floor(memory_slots * q + 1e-9))
    return (budget < planner._saturation(T, a, q, strategy)
            and planner._boundary_chunks(T, budget, a, q, strategy) is None)


def chain_cases(mode):
    settings = CHAIN_MODES[mode]
    cases = [(T, float(m), strategy, alpha)
             for T in settings["lengths"] for alpha in CHAIN_ALPHAS
             for strategy in ("msm", "hsm", "ism") for m in settings["budgets"]
             if chain_route(T, m, strategy, alpha)]
    if mode == 1:  # budgets of 2 slots recompute triangles (quadratic op lists): short T
        cases = [case for case in cases if case[1] > 2 or case[0] <= 60]
    return cases


def plan_case(T, memory_slots, strategy, alpha, mode=0):
    """The plan, with the chained method forced as in `CHAIN_MODES[mode]` (mode 0: as
    `plan` chooses), from a fresh cache."""
    saved = planner._EXACT_WORK_LIMIT, planner._CHUNK_WORK_LIMIT, planner._CHUNK_SLACK
    planner._cached_plan.cache_clear()
    try:
        if mode:
            settings = CHAIN_MODES[mode]
            a, q = planner.alpha_units(alpha)
            budget = int(math.floor(memory_slots * q + 1e-9))
            work = planner._dp_work(T, budget, a, q, strategy)[0]
            planner._EXACT_WORK_LIMIT = 0
            planner._CHUNK_WORK_LIMIT = work * settings["work_fraction"]
            if settings["slack"] is not None:
                planner._CHUNK_SLACK = settings["slack"]
        return planner.plan(T, memory_slots, strategy=strategy, alpha=alpha)
    finally:
        planner._EXACT_WORK_LIMIT, planner._CHUNK_WORK_LIMIT, planner._CHUNK_SLACK = saved
        planner._cached_plan.cache_clear()


def main():
    rows, offsets, cases, costs = [], [0], [], []
    for mode, group in ((0, default_cases()), (1, chain_cases(1)), (2, chain_cases(2))):
        for T, memory_slots, strategy, alpha in group:
            result = plan_case(T, memory_slots, strategy, alpha, mode)
            table = result.op_table()
            assert table.min() >= -1 and table.max() < 2 ** 15
            rows.append(table.astype(np.int16))
            offsets.append(offsets[-1] + len(table))
            cases.append((T, memory_slots, STRATEGIES.index(strategy), alpha, mode))
            costs.append((result.forward_evals, result.peak_memory,
                          METHODS.index(result.method)))
    digest_cases, digests = [], []
    for T, memory_slots, strategy, alpha, slow in DIGEST_CASES:
        result = plan_case(T, memory_slots, strategy, alpha)
        digest_cases.append((T, memory_slots, STRATEGIES.index(strategy), alpha, slow,
                             result.forward_evals, result.peak_memory,
                             METHODS.index(result.method)))
        digests.append(table_digest(result.op_table()))
        print(T, memory_slots, strategy, alpha, result.method, digests[-1], flush=True)
    path = pathlib.Path(__file__).with_name("frozen_plans.npz")
    # Column-major rows compress several times better (slots and counts vary smoothly).
    np.savez_compressed(
        path, columns=np.ascontiguousarray(np.concatenate(rows).T),
        offsets=np.asarray(offsets, np.int64),
        cases=np.asarray(cases, np.float64), costs=np.asarray(costs, np.float64),
        digest_cases=np.asarray(digest_cases, np.float64),
        digests=np.asarray(digests, "U64"))
    print(f"{path}: {len(cases)} plans, {offsets[-1]} ops, {len(digests)} digests, "
          f"{path.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
