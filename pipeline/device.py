"""Threads, precision and device of this process: set once, before TensorFlow runs an op.

    set_threads(settings.threads)     # first, before TensorFlow runs an op (no-op for 0)
    configure(settings) -> "CPU (2 cores, 2 threads, float32)"    # also what is logged

`threads` = 0 keeps TensorFlow's default (one intra-op thread per core); N > 0 limits the
intra-op pool to N threads and the inter-op pool to 2, for several workers on one machine
(workers × threads ≈ cores). `mixed_precision` = 1 trains in float16 with float32
variables (Keras' `mixed_float16` policy; the model keeps its softmax in float32); it
needs a GPU, where it roughly halves memory traffic. The description names the device
that trains: the first GPU when TensorFlow sees one, else the CPU.
"""

from __future__ import annotations

import os
import sys

from pipeline.config import Settings
from pipeline.errors import PipelineError

INTER_OP_THREADS = 2  # parallel independent ops; more only adds contention on small CPUs


def set_threads(threads: int) -> None:
    """Size TensorFlow's thread pools (0: leave its default, one intra-op thread per core).

    The pools are fixed once TensorFlow has run an op; a process that already did (a test
    session, a notebook) keeps its pools and gets a warning."""
    if not threads:
        return
    import tensorflow as tf

    threading = tf.config.threading
    wanted = (threads, min(INTER_OP_THREADS, threads))
    if (threading.get_intra_op_parallelism_threads(), threading.get_inter_op_parallelism_threads()) == wanted:
        return
    try:
        threading.set_intra_op_parallelism_threads(wanted[0])
        threading.set_inter_op_parallelism_threads(wanted[1])
    except RuntimeError:
        print(f"warning: threads={threads} not applied: TensorFlow already runs in this process with "
              f"{threading.get_intra_op_parallelism_threads() or 'its default'} threads", file=sys.stderr)


def _threads() -> int:
    import tensorflow as tf

    return tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()


def gpus() -> list:
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def configure(settings: Settings) -> str:
    """Apply `mixed_precision`; return the description of the device that trains."""
    import keras

    found = gpus()
    if settings.mixed_precision and not found:
        raise PipelineError("mixed_precision=1: needs a GPU and TensorFlow sees none (use 0 on CPUs)")
    policy = "mixed_float16" if settings.mixed_precision else "float32"
    keras.mixed_precision.set_global_policy(policy)
    if found:
        import tensorflow as tf

        details = tf.config.experimental.get_device_details(found[0])
        name = details.get("device_name", found[0].name)
        return f"GPU ({name}{f' + {len(found) - 1} more' if len(found) > 1 else ''}, {policy})"
    return f"CPU ({os.cpu_count()} cores, {_threads()} threads, {policy})"
