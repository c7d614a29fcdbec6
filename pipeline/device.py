"""Keras backend, threads, precision and device of this process: set once, before Keras runs.

    use_backend(settings.keras_backend)   # first, before Keras is imported
    set_threads(settings.threads)         # before the backend runs an op (no-op for 0)
    configure(settings) -> "CPU (2 cores, 2 threads, mixed_bfloat16 (auto: avx512_bf16), tensorflow)"   # also logged

`backend` picks Keras 3's backend (tensorflow, jax or torch; KERAS_BACKEND when the setting
is empty, else tensorflow); Keras reads it once, at its import. `threads` = 0 keeps the
backend's default (one intra-op thread per core); N > 0 limits TensorFlow's intra-op pool to
N threads and its inter-op pool to 2, or PyTorch's pool to N, for several workers on one
machine (workers x threads ~ cores); JAX sizes its CPU pool at start and has no such switch.

Precision is Keras' global dtype policy, on every backend (`precision`, the one place that
picks it). `precision` = bfloat16 trains under `mixed_bfloat16`: float32 variables, bfloat16
compute, the output layer (logits and softmax) in float32, so a saved model predicts float32
probabilities; float32 trains in float32; auto (the default), on a CPU, in bfloat16 where the
CPU computes it natively, else float32: `cpu_bfloat16` is that rule, in one place, from the
CPU's flags (`cpu_flags`: /proc/cpuinfo's, or the space-separated list in the environment
variable PIPELINE_CPU_FLAGS where it is set, even empty: tests and what-ifs). `mixed_precision`
= 1 trains with float32 variables and 16-bit compute on a GPU: bfloat16 on cards that compute in
it (compute capability 8.0 and newer: A100, H100, ...), else float16 with loss scaling; it is
refused on a CPU (`precision` is the CPU's switch). On a GPU without `mixed_precision`, auto and
float32 train in float32 and bfloat16 under `mixed_bfloat16`. The description names the device
that trains (the first GPU the backend sees, else the CPU), the policy (and on a CPU why auto
chose it), the backend, and CUDA_VISIBLE_DEVICES where it is set (one worker per GPU). Keras'
`clear_session` resets the policy to float32: pipeline.train.clear_session keeps it.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from pipeline.config import Settings
from pipeline.errors import PipelineError

INTER_OP_THREADS = 2  # parallel independent ops; more only adds contention on small CPUs
CPU_FLAGS = "PIPELINE_CPU_FLAGS"  # where set (even empty), replaces /proc/cpuinfo's flags: `cpu_flags`
# The flags under which precision=auto trains in bfloat16 on a CPU, the first one found named in the
# description: AMX's bfloat16 tiles, AVX-512's bfloat16 dot products (`cpu_bfloat16`)
BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16")

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


def cpu_flags() -> set[str]:
    """This CPU's feature flags: the space-separated list in PIPELINE_CPU_FLAGS where that is set,
    else the first `flags` line of /proc/cpuinfo (none where there is no such file)."""
    override = os.environ.get(CPU_FLAGS)
    if override is not None:
        return set(override.split())
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return set(next((line.partition(":")[2].split() for line in lines if line.startswith("flags")), []))


def cpu_bfloat16(flags: set[str]) -> str:
    """The rule of precision=auto on a CPU: the flag by which a CPU with `flags` trains in
    bfloat16 (the first of BFLOAT16_FLAGS it has), '' where it trains in float32."""
    return next((flag for flag in BFLOAT16_FLAGS if flag in flags), "")


def precision(settings: Settings, found: list[tuple[str, float]]) -> tuple[str, str]:
    """The Keras dtype policy (float32, mixed_bfloat16 or mixed_float16) and how the device
    description names it: `mixed_precision` on a GPU (mixed_bfloat16 at compute capability >= 8,
    else mixed_float16), else `precision` (auto on a CPU: `cpu_bfloat16`, on a GPU float32)."""
    if settings.mixed_precision:
        if not found:
            raise PipelineError(f"mixed_precision=1: needs a GPU and the {backend()} backend sees none (use 0 on "
                                "CPUs; precision=bfloat16 trains in bfloat16 on a CPU)")
        chosen = "mixed_bfloat16" if found[0][1] >= 8 else "mixed_float16"
        return chosen, chosen
    if settings.precision == "bfloat16":
        return "mixed_bfloat16", "mixed_bfloat16 (precision=bfloat16)"
    if settings.precision == "float32" or found:
        return "float32", "float32"
    flag = cpu_bfloat16(cpu_flags())
    return ("mixed_bfloat16", f"mixed_bfloat16 (auto: {flag})") if flag else ("float32", "float32 (auto: no bfloat16 flag)")


def dtype_policy() -> str:
    """The Keras dtype policy this process trains in (what `configure` set)."""
    import keras

    return keras.mixed_precision.global_policy().name


def configure(settings: Settings) -> str:
    """Apply `precision` and `mixed_precision`; return the description of the device that trains."""
    import keras

    found = gpus()
    chosen, label = precision(settings, found)
    keras.mixed_precision.set_global_policy(chosen)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")  # one worker per GPU: which one this is
    where = "" if visible is None else f"; CUDA_VISIBLE_DEVICES={visible}"
    if found:
        more = f" + {len(found) - 1} more" if len(found) > 1 else ""
        return f"GPU ({found[0][0]}{more}, {label}, {backend()}{where})"
    return f"CPU ({os.cpu_count()} cores, {_threads()} threads, {label}, {backend()}{where})"
