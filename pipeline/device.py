"""Keras backend, threads, precision and device of this process: set once, before Keras runs.

    use_backend(settings.keras_backend)   # first, before Keras is imported
    set_threads(settings.threads)         # before the backend runs an op (no-op for 0)
    configure(settings) -> "CPU (2 cores, 2 threads, float32, tensorflow)"   # also what is logged

`backend` picks Keras 3's backend (tensorflow, jax or torch; KERAS_BACKEND when the setting
is empty, else tensorflow); Keras reads it once, at its import. `threads` = 0 keeps the
backend's default (one intra-op thread per core); N > 0 limits TensorFlow's intra-op pool to
N threads and its inter-op pool to 2, or PyTorch's pool to N, for several workers on one
machine (workers x threads ~ cores); JAX sizes its CPU pool at start and has no such switch.
`mixed_precision` = 1 trains with float32 variables and 16-bit compute (the model keeps its
softmax in float32) where that helps: on a GPU, bfloat16 on cards that compute in it
(compute capability 8.0 and newer: A100, H100, ...), else float16 with loss scaling. The
description names the device that trains (the first GPU the backend sees, else the CPU), the
precision and the backend, and CUDA_VISIBLE_DEVICES where it is set (one worker per GPU).
"""

from __future__ import annotations

import importlib.util
import os
import sys

from pipeline.config import Settings
from pipeline.errors import PipelineError

INTER_OP_THREADS = 2  # parallel independent ops; more only adds contention on small CPUs

# Packages a backend imports without needing them, kept out of the process (importing them then
# fails, as their importer allows): TensorFlow's tf.lite imports JAX whenever it is installed,
# about 0.25-1 s of TensorFlow's 5-13 s import and 100-130 MB resident (bench/README.md).
UNUSED_IMPORTS = {"tensorflow": ("jax",)}


def use_backend(name: str) -> None:
    """Make `name` the Keras backend of this process (KERAS_BACKEND, read at Keras' import)."""
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != name:
            raise PipelineError(f"backend={name!r}: Keras already runs on {keras.backend.backend()!r} in this "
                                "process (the backend is fixed when Keras is imported)")
    elif importlib.util.find_spec(name) is None:
        raise PipelineError(f"backend={name!r}: the {name} package is not installed "
                            f"(README, \"Backends and GPUs\", says how to install it)")
    else:
        sys.modules.update({unused: None for unused in UNUSED_IMPORTS.get(name, ()) if unused not in sys.modules})
    os.environ["KERAS_BACKEND"] = name


def backend() -> str:
    import keras

    return keras.backend.backend()


def set_threads(threads: int) -> None:
    """Size the backend's thread pools (0: leave its default, one intra-op thread per core).

    TensorFlow's pools are fixed once it has run an op; a process that already did (a test
    session, a notebook) keeps its pools and gets a warning."""
    if not threads:
        return
    name = backend()
    if name == "jax":
        raise PipelineError(f"threads={threads}: not supported on the jax backend (JAX sizes its CPU thread pool "
                            "itself; use 0)")
    if name == "torch":
        import torch

        torch.set_num_threads(threads)
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
    name = backend()
    if name == "torch":
        import torch

        return torch.get_num_threads()
    if name == "tensorflow":
        import tensorflow as tf

        return tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    return os.cpu_count()


def gpus() -> list[tuple[str, float]]:
    """(name, compute capability) of each GPU the backend sees."""
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        found = []
        for device in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(device)
            major, minor = details.get("compute_capability", (0, 0))
            found.append((details.get("device_name", device.name), major + minor / 10))
        return found
    if name == "jax":
        import jax

        return [(d.device_kind, float(getattr(d, "compute_capability", 0) or 0)) for d in jax.devices()
                if d.platform == "gpu"]
    import torch

    return [(torch.cuda.get_device_name(i), float("{}.{}".format(*torch.cuda.get_device_capability(i))))
            for i in range(torch.cuda.device_count())]


def precision(settings: Settings, found: list[tuple[str, float]]) -> str:
    """The Keras dtype policy: float32, or on a GPU mixed_bfloat16 (compute capability >= 8)
    or mixed_float16."""
    if not settings.mixed_precision:
        return "float32"
    if not found:
        raise PipelineError(f"mixed_precision=1: needs a GPU and the {backend()} backend sees none (use 0 on CPUs)")
    return "mixed_bfloat16" if found[0][1] >= 8 else "mixed_float16"


def configure(settings: Settings) -> str:
    """Apply `mixed_precision`; return the description of the device that trains."""
    import keras

    found = gpus()
    policy = precision(settings, found)
    keras.mixed_precision.set_global_policy(policy)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # one worker per GPU: which one this is
    where = "" if visible is None else f"; CUDA_VISIBLE_DEVICES={visible}"
    if found:
        more = f" + {len(found) - 1} more" if len(found) > 1 else ""
        return f"GPU ({found[0][0]}{more}, {policy}, {backend()}{where})"
    return f"CPU ({os.cpu_count()} cores, {_threads()} threads, {policy}, {backend()}{where})"
