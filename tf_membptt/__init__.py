"""tf_membptt: memory-efficient backpropagation through time for Keras 3 / TensorFlow.

Train recurrent networks on long sequences inside a memory budget you choose, with exactly
the gradients of standard BPTT (Gruslys et al., "Memory-Efficient Backpropagation Through
Time", NeurIPS 2016).
"""

from tf_membptt.planner import plan
from tf_membptt.schedule import Op, OpKind, Plan

__version__ = "0.1.0"


def __getattr__(name):
    # The Keras layer pulls in TensorFlow; import it lazily so that the planner (and the
    # CLI's planning) stays free of TensorFlow.
    if name == "MemoryEfficientRNN":
        from tf_membptt.layer import MemoryEfficientRNN

        return MemoryEfficientRNN
    raise AttributeError(f"module 'tf_membptt' has no attribute {name!r}")


__all__ = ["MemoryEfficientRNN", "Op", "OpKind", "Plan", "plan", "__version__"]
