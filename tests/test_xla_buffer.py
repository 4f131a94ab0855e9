"""Under XLA the stored states live in flat buffers that must be updated and read in
place. A read that XLA lowers through a padded copy of the whole buffer (what a slice of
size -1 at a dynamic offset became) made msm/ism steps ~15-30x slower than standard BPTT;
this checks the compiled program for any tensor at least twice the buffer's width."""

import re

import keras
import pytest
import tensorflow as tf

from tf_membptt import MemoryEfficientRNN
from tf_membptt.executor.run import make_store


@pytest.mark.parametrize("strategy", ["msm", "ism", "hsm"])
def test_no_copy_of_twice_the_state_buffer(strategy):
    cell = keras.layers.LSTMCell(8)
    layer = MemoryEfficientRNN(cell, memory_budget=0.3, strategy=strategy)
    x = tf.random.normal([4, 40, 3])
    layer(x[:, :2])

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(loss, cell.trainable_variables)

    hlo = step.experimental_get_compiler_ir(x)(stage="optimized_hlo")
    (program,) = layer._programs.values()
    store, _ = make_store(program, layer.last_plan, xla=True)
    (width,) = [c + w for c, w in zip(store.capacity, store.width)]  # one float32 group
    assert re.search(rf"f32\[4,{width}\]", hlo), "the state buffer is in the program"
    dims = [int(d) for shape in re.findall(r"f32\[([0-9,]+)\]", hlo)
            for d in shape.split(",") if d]
    assert max(dims) < 2 * width, (max(dims), width)
