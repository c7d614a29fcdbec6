"""Train-step time, achieved GFLOP/s against the CPU's peak, and accuracy at equal epochs of the
CIFAR-10 recipe's network in each way a CPU can train in bfloat16 (issue 37).

    python bench/precision.py                       # every mode at batches 256, 512, 1024, all cores
    python bench/precision.py --modes float32 mixed_bfloat16 --batches 512 --steps 10 --threads 2
    python bench/precision.py --epochs 10 --data ../shared/data/cifar10-sample   # and test accuracy

Modes, each in its own process (the backend and oneDNN's settings are fixed at import), one
after the other:
- `float32`: TensorFlow, Keras' float32 policy (what `precision=float32` trains in);
- `mixed_bfloat16`: TensorFlow, Keras' `mixed_bfloat16` policy (what `precision=bfloat16` trains in);
- `onednn-fpmath`: float32, with ONEDNN_DEFAULT_FPMATH_MODE=BF16 and TF_SET_ONEDNN_FPMATH_MODE=BF16
  set before TensorFlow's import (oneDNN may compute float32 convolutions and matmuls in bfloat16);
- `onednn-amp`: float32, with TensorFlow's oneDNN auto-mixed-precision graph rewrite
  (`tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})`;
  "unavailable" where this TensorFlow does not take the option);
- `jax-bf16`: KERAS_BACKEND=jax (jit-compiled) with `mixed_bfloat16` ("unavailable" without JAX;
  JAX sizes its thread pool itself: pin the process with taskset to limit it).

The network is search_spaces/airbench.yaml's `default` (airbench94) as the pipeline builds it
(`pipeline.train.model_for`: the whitening stem fitted to the batches' images), at 32x32x3 and 10
classes, on random uint8 images (a step's time does not depend on the pixels). Per batch size the
step time is that of the time budget's probe (`pipeline.budget.probe`): `--warmup` untimed steps,
then the median of `--steps` timed steps of one `model.fit`, in ms, and images per second. GFLOP/s:
the forward multiply-adds per image counted from the model's layers (a conv's H_out x W_out x k x k
x C_in x C_out, a dense layer's in x out: every layer with a kernel), a training step taken as 3
forward passes, 2 FLOP per multiply-add. The CPU's peak, an assumption the record states: threads x
GHz (/proc/cpuinfo's "cpu MHz", nominal in a virtual machine) x `--flop-per-cycle` (64: AVX-512,
two 512-bit FMA units, float32; Zen 4 runs AVX-512 on 256-bit units: give 32); bfloat16 16x that
with AMX (1,024), 2x with AVX512-BF16 (128), none without. `roofline` is GFLOP/s over the float32
peak, `roofline_bf16` over the bfloat16 peak; `speed` the mode's images/s over float32's at the
same batch. `--epochs E --data DIR` also trains each mode E epochs on an image folder with `train/`
and `test/` (the pipeline's loader; `pipeline.train.fit_full`, the refit's fit, at the
configuration's own batch size) and scores the test split with the configuration's test-time views,
as the refit scores it: test accuracy and seconds per epoch (median after the first).

Writes one JSON record, bench/results/precision/<CPU kind>/<UTC time>.json (<CPU kind>: model
name, family and model number, as amd-epyc-f26-m2; `--results DIR`: another folder): the command,
commit, date, CPU (model, family, model number, AVX512-BF16, AMX, MHz), threads, the peak and its
assumption, the model's multiply-adds, and per mode and batch size ms/step, images/s, GFLOP/s,
roofline ratios and speed against float32, and the accuracy where measured. Last line:
`name=value` pairs, `<mode>_<batch>_ms` and `<mode>_<batch>_speed` (and `<mode>_test_accuracy`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, EpochClock, kind_folder, machine, result_line

RESULTS = ROOT / "bench" / "results" / "precision"
SPACE = ROOT / "search_spaces" / "airbench.yaml"
SHAPE, CLASSES = (32, 32, 3), 10
AMP_OPTION = "auto_mixed_precision_onednn_bfloat16"
ONEDNN_BF16 = {"ONEDNN_DEFAULT_FPMATH_MODE": "BF16", "TF_SET_ONEDNN_FPMATH_MODE": "BF16"}
# mode -> (Keras backend, Keras dtype policy, environment set before the backend's import)
MODES = {
    "float32": ("tensorflow", "float32", {}),
    "mixed_bfloat16": ("tensorflow", "mixed_bfloat16", {}),
    "onednn-fpmath": ("tensorflow", "float32", ONEDNN_BF16),
    "onednn-amp": ("tensorflow", "float32", {}),
    "jax-bf16": ("jax", "mixed_bfloat16", {}),
}
FLOAT32_MODES = ("float32",)  # the modes that compute in float32 (the others may use bfloat16)
BF16_RATE = {"amx_bf16": 16, "avx512_bf16": 2}  # a core's bfloat16 FLOP a cycle over its float32 FLOP, by flag


def cpuinfo(name: str) -> str:
    """The first value of the /proc/cpuinfo field `name` ('' where there is none)."""
    path = Path("/proc/cpuinfo")
    lines = path.read_text().splitlines() if path.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == name), "")


def peaks(threads: int, flop_per_cycle: int) -> dict:
    """The CPU's float32 and bfloat16 peak GFLOP/s on `threads` cores, and the assumption."""
    ghz = float(cpuinfo("cpu MHz") or 0) / 1000
    flags = set(cpuinfo("flags").split())
    bf16_flag = next((f for f in BF16_RATE if f in flags), "")
    bf16 = BF16_RATE.get(bf16_flag, 0) * flop_per_cycle
    return {"ghz": ghz, "float32_gflops": round(threads * ghz * flop_per_cycle, 1),
            "bfloat16_gflops": round(threads * ghz * bf16, 1) or None,
            "assumption": f"{threads} cores x {ghz:.2f} GHz (/proc/cpuinfo cpu MHz) x {flop_per_cycle} float32 FLOP a "
                          f"cycle (AVX-512, two FMA units); bfloat16 "
                          + (f"{bf16} FLOP a cycle ({bf16_flag})" if bf16 else "none (no bfloat16 flag)")}


def forward_macs(model) -> int:
    """Multiply-adds of one image's forward pass: every layer with a kernel, its kernel's size
    times its output's positions (a conv's H_out x W_out, a dense layer's 1)."""
    total = 0
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        positions = 1
        for side in layer.output.shape[1:-1]:
            positions *= side
        size = 1
        for n in kernel.shape:
            size *= n
        total += positions * size
    return total


def setup_mode(mode: str, threads: int) -> str:
    """In a child: the backend, threads and policy of `mode`; '' or why it is unavailable."""
    backend, policy, _ = MODES[mode]
    from pipeline.device import set_threads, use_backend
    from pipeline.errors import PipelineError

    try:
        use_backend(backend)
    except PipelineError as e:
        return str(e)
    import keras

    if backend != "jax":  # JAX sizes its own pool (the process's affinity)
        set_threads(threads)
    keras.mixed_precision.set_global_policy(policy)
    if mode == "onednn-amp":
        import tensorflow as tf

        tf.config.optimizer.set_experimental_options({AMP_OPTION: True})
        if tf.config.optimizer.get_experimental_options().get(AMP_OPTION) is not True:
            return f"this TensorFlow ({tf.__version__}) has no {AMP_OPTION} option"
    return ""


def child(args) -> None:
    """Measure one mode in this process; print one JSON line."""
    why = setup_mode(args.mode, args.threads)
    if why:
        print(json.dumps({"status": "unavailable", "why": why}), flush=True)
        return
    import keras
    import numpy as np

    from pipeline.budget.probe import probe
    from pipeline.model import build_model
    from pipeline.space import load_space

    params = load_space(SPACE).default
    macs = forward_macs(build_model(params, SHAPE, CLASSES))
    rng = np.random.default_rng(args.seed)
    steps = {}
    for batch in args.batches:
        rows = batch * (args.warmup + args.steps + 1)  # the probe times the steps after the warm-up's last
        x = rng.integers(0, 256, (rows, *SHAPE), dtype=np.uint8)
        y = rng.integers(0, CLASSES, rows).astype(np.int32)
        cost = probe({**params, "batch_size": batch}, x, y, np.arange(rows), SHAPE, CLASSES, seed=args.seed,
                     warmup=args.warmup, batches=args.steps + 1)
        steps[batch] = {"ms_per_step": round(cost.batch * 1000, 1), "images_per_s": round(batch / cost.batch, 1)}
        print(f"{args.mode} batch {batch}: {steps[batch]['ms_per_step']} ms a step", file=sys.stderr, flush=True)
    out = {"status": "ok", "backend": keras.backend.backend(), "policy": keras.mixed_precision.global_policy().name,
           "forward_macs": macs, "steps": steps}
    if args.epochs:
        out["accuracy"] = accuracy(params, args)
    print(json.dumps(out), flush=True)


def accuracy(params: dict, args) -> dict:
    """Train `params` `args.epochs` epochs on all of `args.data`'s train/ rows as the refit does and
    score its test/ rows through the configuration's test-time views."""
    from pipeline.data import load_dataset
    from pipeline.model import for_serving, inference_batch, with_tta
    from pipeline.train import fit_full

    data = load_dataset(args.data, args.seed)
    clock = EpochClock()
    model = fit_full(params, data.x_train, data.y_train, data.input_shape, data.n_classes, epochs=args.epochs,
                     seed=args.seed, callbacks=[clock])
    served = with_tta(for_serving(model), params.get("tta", "none"))
    x_test, y_test = data.test.open()
    predicted = served.predict(x_test, verbose=0, batch_size=inference_batch(data.input_shape)).argmax(axis=1)
    return {"data": args.data, "epochs": args.epochs, "batch_size": params.get("batch_size"),
            "train_images": len(data.y_train), "test_images": len(y_test),
            "test_accuracy": round(float((predicted == y_test).mean()), 4), "epoch_s": round(clock.steady(), 2),
            "epochs_s": [round(float(s), 2) for s in clock.fits[-1]]}


def run_mode(mode: str, args) -> dict:
    """Run `mode`'s child process; its JSON answer, or why it failed."""
    backend, _, env = MODES[mode]
    if importlib.util.find_spec(backend) is None:
        return {"status": "unavailable", "why": f"{backend} is not installed"}
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--threads", str(args.threads), "--steps",
           str(args.steps), "--warmup", str(args.warmup), "--seed", str(args.seed), "--epochs", str(args.epochs),
           "--data", args.data, "--batches", *map(str, args.batches)]
    environment = {**os.environ, **env, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    start = time.perf_counter()
    done = subprocess.run(cmd, env=environment, capture_output=True, text=True)
    answers = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not answers:
        return {"status": "failed", "why": f"exit {done.returncode}: {(done.stderr.strip().splitlines() or [''])[-1]}"}
    return {**json.loads(answers[-1]), "env": env, "process_s": round(time.perf_counter() - start, 1)}


def figures(rows: dict, peak: dict) -> None:
    """Add GFLOP/s, roofline ratios and speed against float32 to each mode's steps."""
    base = rows.get("float32", {}).get("steps", {})
    for mode, row in rows.items():
        for batch, step in row.get("steps", {}).items():
            gflops = 3 * 2 * row["forward_macs"] * step["images_per_s"] / 1e9
            step["gflops"] = round(gflops, 1)
            step["roofline"] = round(gflops / peak["float32_gflops"], 3) if peak["float32_gflops"] else None
            bf16 = peak["bfloat16_gflops"] if mode not in FLOAT32_MODES else None
            step["roofline_bf16"] = round(gflops / bf16, 3) if bf16 else None
            step["speed"] = round(step["images_per_s"] / base[batch]["images_per_s"], 2) if batch in base else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--batches", nargs="*", type=int, default=[256, 512, 1024])
    ap.add_argument("--steps", type=int, default=10, help="timed train steps per batch size (their median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (tracing, caches)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="intra-op threads (TensorFlow)")
    ap.add_argument("--flop-per-cycle", type=int, default=64, help="a core's float32 FLOP a cycle (the peak's assumption)")
    ap.add_argument("--epochs", type=int, default=0, help="also train E epochs on --data and score its test split")
    ap.add_argument("--data", default="../shared/data/cifar10-sample", help="an image folder with train/ and test/")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--results", default=str(RESULTS), help="the records' folder (a folder per CPU kind inside)")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    where = machine()
    record = {"command": " ".join(["python", "bench/precision.py", *(sys.argv[1:] if argv is None else argv)]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **where,
              "threads": args.threads, "network": f"{SPACE.relative_to(ROOT)} default, {SHAPE}, {CLASSES} classes",
              "peak": peaks(args.threads, args.flop_per_cycle), "modes": {}}
    for mode in args.modes:
        record["modes"][mode] = run_mode(mode, args)
        print(mode, json.dumps(record["modes"][mode]), flush=True)
    figures(record["modes"], record["peak"])
    record["load_after"] = [round(x, 2) for x in os.getloadavg()]
    path = Path(args.results) / kind_folder(where) / f"{record['date'].replace(':', '')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"record: {path}")
    out = {}
    for mode, row in record["modes"].items():
        for batch, step in row.get("steps", {}).items():
            out.update({f"{mode}_{batch}_ms": step["ms_per_step"], f"{mode}_{batch}_gflops": step["gflops"],
                        f"{mode}_{batch}_speed": step["speed"]})
        if "accuracy" in row:
            out[f"{mode}_test_accuracy"] = row["accuracy"]["test_accuracy"]
        if row["status"] != "ok":
            out[f"{mode}_status"] = row["status"]
    print(result_line(out))
    return record


if __name__ == "__main__":
    main()
