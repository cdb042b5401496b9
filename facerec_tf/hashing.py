"""Counter-based random numbers from integer hashing, identical under XLA and without it.

TensorFlow's stateless random ops give different numbers inside an XLA cluster than outside
(XLA's Philox lays out its counters differently), so anything that must agree between a
``jit_compile`` step and a plain one (Partial FC's class sampling) hashes integers instead.
"""

from __future__ import annotations


def mix32(x):
    """``lowbias32`` integer finaliser on uint32 tensors (wrapping arithmetic)."""
    import tensorflow as tf

    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))
    x = x * tf.constant(0x7FEB352D, tf.uint32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(15, tf.uint32)))
    x = x * tf.constant(0x846CA68B, tf.uint32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, tf.constant(16, tf.uint32)))


def hash_uniform(seed, n: int):
    """``float32 [n]`` uniforms in [0, 1): a pure function of the int32 ``seed`` pair and
    the position, the same bits with or without XLA."""
    import tensorflow as tf

    seed = tf.bitcast(tf.cast(seed, tf.int32), tf.uint32)
    h = mix32(mix32(seed[0] ^ tf.constant(0x9E3779B9, tf.uint32)) ^ seed[1])
    bits = mix32(h ^ mix32(tf.bitcast(tf.range(n, dtype=tf.int32), tf.uint32)))
    return tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), tf.float32) * (
        1.0 / (1 << 24)
    )
