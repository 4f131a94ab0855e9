"""The forms of `memory_budget` and their conversion to memory slots (pure Python).

A budget is one of:

* a float in ``(0, 1]``: a fraction of the activation memory standard BPTT needs for this
  layer and sequence (``alpha * T`` hidden states, as in the paper);
* bytes for the whole batch: an ``int`` or a string with units, e.g. ``"64MiB"``,
  ``"1.5GB"``, ``"512kB"`` (SI units are powers of 1000, IEC units of 1024);
* ``"slots:N"``: ``N`` hidden-state units directly, ``h_0`` included;
* ``None``: no limit (the strategy's own memory: standard BPTT's for ``msm``/``hsm``/``ism``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Optional

from tf_membptt.planner import alpha_units, minimum_memory_slots

_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4,
    "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3, "tib": 1024 ** 4,
}
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_SLOTS_RE = re.compile(r"^\s*slots\s*:\s*([0-9]*\.?[0-9]+)\s*$")
_FRACTION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


@dataclasses.dataclass(frozen=True)
class Budget:
    """A parsed memory budget: ``kind`` is ``"fraction"``, ``"bytes"``, ``"slots"`` or
    ``"unlimited"``; ``value`` is the number in that kind's unit."""

    kind: str
    value: Optional[float]
    original: object = None

    def slots(self, *, num_steps: int, alpha: float, hidden_bytes: Optional[int]) -> float:
        """Memory slots (hidden-state units, ``h_0`` included) for this budget.

        Args:
            num_steps: sequence length.
            alpha: internal-state size in hidden-state units.
            hidden_bytes: bytes of one hidden state for the whole batch, or None when the
                batch size is unknown (then a bytes budget cannot be converted).
        """
        if self.kind == "fraction":
            return float(math.floor(self.value * alpha * num_steps + 1e-9))
        if self.kind == "slots":
            return float(self.value)
        if self.kind == "unlimited":
            return float(1 + alpha * num_steps)
        if hidden_bytes is None:
            raise ValueError(
                f"Argument `memory_budget` is in bytes ({self.original!r}) but the batch size "
                "is not known when the layer is traced, so bytes cannot be turned into a "
                "number of stored states. Give the model a static batch size (e.g. "
                "`keras.Input(..., batch_size=N)`, or a dataset batched with "
                "`drop_remainder=True`), or use a fraction (e.g. memory_budget=0.05) or "
                f"'slots:N'. Received: memory_budget={self.original!r}")
        return self.value / hidden_bytes


def parse_budget(memory_budget) -> Budget:
    """Validates `memory_budget` and returns a `Budget`; raises ValueError otherwise."""
    original = memory_budget
    if memory_budget is None:
        return Budget("unlimited", None, None)

    def fail(why):
        raise ValueError(
            f"Argument `memory_budget` {why}. Received: memory_budget={original!r}")

    if isinstance(memory_budget, bool):
        fail("must be a fraction in (0, 1], bytes (an int or a string such as '64MiB') "
             "or 'slots:N', not a bool")
    if isinstance(memory_budget, numbers.Integral):
        if memory_budget <= 0:
            fail("must be positive")
        return Budget("bytes", float(memory_budget), original)
    if isinstance(memory_budget, numbers.Real):
        value = float(memory_budget)
        if not math.isfinite(value):
            fail("must be finite")
        if not 0.0 < value <= 1.0:
            fail("as a float is a fraction of standard BPTT's memory and must be in (0, 1]; "
                 "pass an int or a string such as '64MiB' for bytes")
        return Budget("fraction", value, original)
    if isinstance(memory_budget, str):
        match = _SLOTS_RE.match(memory_budget)
        if match:
            value = float(match.group(1))
            if value < 1:
                fail("in slots must be at least 1 (h_0 is always held)")
            return Budget("slots", value, original)
        match = _FRACTION_RE.match(memory_budget)
        if match:
            value = float(match.group(1)) / 100.0
            if not 0.0 < value <= 1.0:
                fail("as a percentage must be in (0%, 100%]")
            return Budget("fraction", value, original)
        match = _BYTES_RE.match(memory_budget)
        if match and match.group(2).lower() in _UNITS:
            value = float(match.group(1)) * _UNITS[match.group(2).lower()]
            if value < 1:
                fail("as a string is bytes and must be at least 1 byte; for a fraction of "
                     "standard BPTT's memory pass a float (e.g. 0.05) or a percentage "
                     "(e.g. '5%')")
            return Budget("bytes", value, original)
        fail("is not a recognised budget: use a fraction such as 0.05 or '5%', bytes such "
             "as 67108864 or '64MiB' / '1.5GB', or 'slots:N'")
    fail("must be a float fraction, an int or string of bytes, 'slots:N' or None, not "
         f"{type(memory_budget).__name__}")


def budget_argument(text: str):
    """The `memory_budget=` value that `text`, written on a command line, stands for.

    The one reading of a budget given as text, shared by ``python -m tf_membptt plan`` and
    the examples' ``--budget`` flags, so that a budget means the same everywhere: a number
    in ``(0, 1]`` (``"0.05"``, ``"1"``) is a fraction, as the float ``0.05`` is for the layer;
    a larger whole number (``"67108864"``) is bytes, as the int is; ``"none"`` is no limit;
    every other text (``"5%"``, ``"64MiB"``, ``"slots:N"``) is passed on as the string.
    The result is validated by `parse_budget` (a ValueError names what is wrong)."""
    if not isinstance(text, str):
        raise TypeError(f"Argument `text` must be a str. Received: text={text!r}")
    stripped = text.strip()
    if stripped.lower() == "none":
        return None
    try:
        number = float(stripped)
    except ValueError:
        value = stripped
    else:
        value = int(number) if number > 1 and number.is_integer() else number
    parse_budget(value)
    return value


def format_bytes(num_bytes: float) -> str:
    for unit, size in (("GiB", 1024 ** 3), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f}{unit}"
    return f"{int(num_bytes)}B"



def planning_slots(budget: Budget, *, num_steps: int, alpha: float, strategy: str,
                   hidden_bytes: Optional[float], reserved_slots: float = 0.0) -> float:
    """The memory slots a layer hands the planner for this budget.

    Args:
        budget: the parsed `memory_budget`.
        num_steps: sequence length.
        alpha: internal-state size in hidden states (what the planner charges).
        strategy: the planning strategy.
        hidden_bytes: bytes of one hidden state for the whole batch (None when the batch
            size is unknown: then a bytes budget cannot be converted).
        reserved_slots: memory the executor needs beside the plan's stored states (under
            XLA, its scratch area), taken out of the budget.

    Returns:
        The slots for `planner.plan` (``h_0`` included).

    Raises:
        ValueError: naming the least feasible budget, in the budget's own form, when the
            budget (less `reserved_slots`) is below what `strategy` needs.
    """
    slots = budget.slots(num_steps=num_steps, alpha=alpha, hidden_bytes=hidden_bytes)
    if budget.kind == "unlimited":
        # No limit: room for what the planner charges an internal state (alpha rounded up
        # to a multiple of 1/q), so that peak_memory <= memory_slots and msm/hsm/ism can
        # store every internal state; the reservation comes on top.
        units, per_slot = alpha_units(alpha)
        charged = units / per_slot
        if strategy in ("full", "chen"):
            slots = minimum_memory_slots(num_steps, strategy, charged)
        else:
            slots = max(slots, 1.0 + charged * num_steps)
        return slots
    minimum = minimum_memory_slots(num_steps, strategy, alpha) + reserved_slots
    if slots < minimum - 1e-9:
        if budget.kind == "bytes":
            least = (f"{int(math.ceil(minimum * hidden_bytes))} bytes "
                     f"({format_bytes(minimum * hidden_bytes)})")
        elif budget.kind == "fraction":
            least = f"{minimum / (alpha * num_steps):.6g} (a fraction)"
        else:
            least = f"'slots:{minimum:g}'"
        raise ValueError(
            f"Argument `memory_budget` is below the least feasible budget for this layer "
            f"(strategy={strategy!r}, {num_steps} steps, alpha={alpha:.4g}): it gives "
            f"{slots:.4g} hidden-state slots, and the minimum is {minimum:g} slots"
            + (f" (including {reserved_slots:g} for the XLA executor's scratch state)"
               if reserved_slots else "")
            + f", i.e. memory_budget={least}. Received: memory_budget={budget.original!r}")
    return slots - reserved_slots
