"""Runs a `Plan` with TensorFlow (see `run.py`, `sweeps.py`, `store.py`, `step_program.py`).

Dependencies point one way: the layer calls this package, which reads the planner's
values (`Plan`, `segments.compile_plan`) and never imports Keras.
"""

from tf_membptt.executor.run import (SECOND_ORDER_MESSAGE, in_xla_context, run_deferred,
                                     run_planned, run_plain, watched)
from tf_membptt.executor.step_program import StepProgram, StepSignature
from tf_membptt.executor.store import ListStore, StackStore, scratch_slots
from tf_membptt.executor.sweeps import StepInputs

__all__ = ["ListStore", "SECOND_ORDER_MESSAGE", "StackStore", "StepInputs", "StepProgram",
           "StepSignature", "in_xla_context", "run_deferred", "run_planned", "run_plain",
           "scratch_slots", "watched"]
