"""The few TensorFlow and Keras internals the package relies on, each checked for the
behaviour it is used for. A release that moves or changes one fails here, by name, instead
of silently changing what the layer does. (Where a fallback exists, the module that uses
the internal says which.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_membptt import cell_step
from tf_membptt.executor import run, step_program


def test_should_record_backprop_tells_watched_tensors():
    """`executor.watched` (record.should_record_backprop): chooses the planned path.
    Its fallback (True) would take the planned path where no gradient is asked for."""
    from tensorflow.python.eager import record

    assert hasattr(record, "should_record_backprop")
    x, y = tf.constant(1.0), tf.constant(2.0)
    with tf.GradientTape() as tape:
        tape.watch(x)
        assert run.watched([x]) and not run.watched([y])
    assert not run.watched([x])


def test_xla_context_is_detected():
    """`executor.in_xla_context` (control_flow_util.GraphOrParentsInXlaContext): chooses
    the flat-buffer store, which XLA updates in place."""
    seen = {}

    @tf.function(jit_compile=True)
    def compiled(x):
        seen["xla"] = run.in_xla_context()
        return x + 1.0

    @tf.function
    def plain(x):
        seen["graph"] = run.in_xla_context()
        return x + 1.0

    compiled(tf.constant(1.0))
    plain(tf.constant(1.0))
    assert seen == {"xla": True, "graph": False}


def test_call_flat_feeds_captured_inputs():
    """`step_program._call` (ConcreteFunction._call_flat): feeds a pruned function this
    call's values for the tensors its trace captured (dropout masks)."""
    captured = tf.constant([1.0, 2.0])
    record = {}

    def trace(x):
        record["x"], record["y"] = x, x * captured
        return record["y"]

    wrapped = tf.compat.v1.wrap_function(trace, [tf.TensorSpec([2], tf.float32)])
    pruned = wrapped.prune([record["x"]], [record["y"]])
    out = step_program._call(pruned, [tf.constant([1.0, 1.0])], [tf.constant([3.0, 4.0])])
    np.testing.assert_array_equal(out[0], [3.0, 4.0])


def test_optionals_switch_for_cond_gradients():
    """`step_program._plain_cond_intermediates`
    (context.temporarily_disable_optionals_in_gradients): a `tf.cond` in a cell keeps
    storable intermediates. Without it such cells are refused with a clear error."""
    from tensorflow.python.eager import context

    assert hasattr(context, "temporarily_disable_optionals_in_gradients")
    types = {}

    def trace(x):
        y = tf.cond(tf.reduce_sum(x) > 0, lambda: tf.tanh(x), lambda: tf.sin(x))
        tf.gradients(y, x)
        types["outputs"] = [t.dtype for t in y.op.outputs]
        return y

    with step_program._plain_cond_intermediates():
        tf.compat.v1.wrap_function(trace, [tf.TensorSpec([2], tf.float32)])
    assert tf.variant not in types["outputs"]


def test_stateless_scope_routes_reads_and_assignments():
    """`cell_step._RecordingScope` (a `keras.StatelessScope`): Keras asks the scope for
    every variable read (`get_current_value`) and hands it every assignment
    (`add_update`); the scope's values replace the variables'."""
    variable = keras.Variable(np.ones(2, np.float32))
    counter = keras.Variable(0.0, trainable=False)
    replacement = tf.constant([5.0, 6.0])
    with cell_step._RecordingScope([(variable, replacement), (counter, tf.constant(1.0))]) \
            as scope:
        read = variable.value
        counter.assign(counter + 1.0)
    np.testing.assert_array_equal(read, [5.0, 6.0])
    assert scope.get_current_value(counter).numpy() == 2.0
    assert [v is counter for v in scope.assigned] == [True]
    assert counter.numpy() == 0.0  # nothing applied


def test_keras_variable_raw_value_and_dtype():
    """`cell_step.read_raw` / `raw_dtype` (a Keras variable's `_value`): the variable's own
    dtype inside a mixed-precision layer, where `variable.value` is the autocast one."""
    variable = keras.Variable(np.ones(2, np.float32))
    assert isinstance(variable._value, tf.Variable)
    with keras.src.backend.AutocastScope("float16"):
        assert variable.value.dtype == tf.float16
        assert cell_step.read_raw(variable).dtype == tf.float32
        assert cell_step.raw_dtype(variable) == tf.float32


def test_save_context_is_visible_while_saving(tmp_path):
    """`run._in_save_context` (save_context.in_save_context): lets a SavedModel export trace
    the layer's gradient without tripping the second-order refusal."""
    seen = []

    class Module(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([], tf.float32)])
        def f(self, x):
            seen.append(run._in_save_context())
            return x + 1.0

    module = Module()
    module.f(tf.constant(1.0))
    tf.saved_model.save(module, str(tmp_path / "m"))
    assert seen[0] is False and True in seen[1:]


def test_xla_dynamic_update_slice_import():
    """`store.StackStore` writes with tf2xla's dynamic_update_slice."""
    from tensorflow.compiler.tf2xla.python import xla

    assert callable(xla.dynamic_update_slice)


def _sums_after_grappler(tag_sums):
    """The op types that compute ``a @ w + sin(a) + cos(a)`` in a `tf.function` after
    grappler (the graph TensorFlow runs, from the run metadata)."""
    from tensorflow.python.eager import context

    w = tf.ones([4, 4])

    @tf.function
    def f(a):
        y = tf.tanh(a @ w + tf.sin(a) + tf.cos(a))
        if tag_sums:
            step_program._keep_sums_in_order(tf.compat.v1.get_default_graph())
        return y

    context.enable_run_metadata()
    try:
        f(tf.ones([3, 4]))
        metadata = context.export_run_metadata()
    finally:
        context.disable_run_metadata()
    return sorted(node.op for graph in metadata.function_graphs
                  for node in graph.post_optimization_graph.node if node.op.startswith("Add"))


def test_grappler_keeps_tagged_sums_apart():
    """`step_program._keep_sums_in_order` (the attribute grappler's arithmetic optimizer
    tags its own rewrites with): without it the layer's graph-mode results change in the
    last bits from run to run (`test_contract.test_same_bits_at_every_run`)."""
    assert _sums_after_grappler(tag_sums=False) == ["AddN"]  # the rewrite it prevents
    assert _sums_after_grappler(tag_sums=True) == ["AddV2", "AddV2"]


def test_keras_rnn_calls_the_cell_once_before_its_loop():
    """The layer reproduces keras.layers.RNN's extra time-zero call of the cell (it keeps
    variable updates: a seed generator advances one draw, a counter counts). If Keras
    stops doing it, the layer must stop too."""
    from cell_zoo import CounterCell

    cell = CounterCell(3)
    rnn = keras.layers.RNN(cell)
    x = tf.zeros([2, 5, 2])
    rnn.build(x.shape)
    rnn(x)
    assert cell.calls.numpy() == 5 + 1


@pytest.mark.parametrize("name", ["StackedRNNCells", "RNN", "StatelessScope"])
def test_public_names_used(name):
    assert hasattr(keras.layers, name) or hasattr(keras, name)
