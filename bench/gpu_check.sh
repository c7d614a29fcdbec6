#!/usr/bin/env bash
# GPU check: one search + refit of the GPU recipe (search_spaces/gpu.yaml, airbench's network
# sized for a GPU, warm-started with airbench94: gpu_start.yaml) on CIFAR-10 images, JAX backend
# (jit-compiled), mixed bfloat16, batch 1024, on one GPU, inside a 5-minute time budget (load,
# search, refit, test and logging: `--time-budget`), timed phase by phase. Made for the
# workplace's device machine (Python 3.12 with JAX 0.11.2/cuda13, no TensorFlow, no network),
# and rehearsed on a CPU with --device cpu.
#
# Usage, from the repository root (or anywhere: it cds there):
#   bench/gpu_check.sh                  # GPU: all 50,000 images, time budget 300 s, batch 1024
#   bench/gpu_check.sh --device cpu     # CPU rehearsal: 60 images a class, float32, batch 128, budget 90 s
#   options: --time-budget T --batch-size B --per-class N (0 = all)
#
# Carried inputs (both ignored by git through .git/info/exclude, so name them in `carry`):
#   .whl/      35 Python 3.12 manylinux x86_64 wheels (--no-deps, one version each, 35 MB) of
#              what the pipeline needs beyond the GPU image: keras, namex, optree, optuna(+
#              integration), colorlog, alembic, Mako, SQLAlchemy, mlflow-skinny, mlflow-tracing,
#              databricks-sdk, opentelemetry-*, pydantic(+core), fastapi, starlette, uvicorn,
#              GitPython, cryptography (MLflow's registry store imports Fernet), cffi, plotly, ...;
#              installed with pip --target /tmp/site, put first on PYTHONPATH.
#   .gpudata/  cifar10-train.tar.gz (16 MB): all 50,000 images of ../shared/data/cifar10-train,
#              cifar10-train/<class>/<n>.jpg (the run holds out a stratified 20% test split:
#              40,000 train = 32,000 + 8,000 validation per trial, 10,000 test).
# Tree + .whl + .gpudata: ~51 MB (49 MiB; the device limit is 64 MiB).
#
# Device call (one call, about 7 minutes: wheels and data ~1 min, the pipeline's 300 s budget;
# timeout_s=600 is the most a call gets):
#   run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpudata"], timeout_s=600)
# Batch 1024 leaves a partial last batch in every split (32,000 / 1024), one more XLA compile
# each. --device cpu stays float32: the pipeline refuses mixed precision without a GPU (and
# jaxlib 0.11.2's CPU backend turns a jitted bfloat16 conv -> relu -> conv into NaN on the
# AVX512-BF16 development CPU; 0.10.2 does not).
#
# Prints: the card (nvidia-smi -L, else "CPU"), python/jax/jaxlib/keras/optuna/mlflow versions
# and the devices JAX sees; the pipeline's output (data load, search progress, refit epochs,
# summary); a per-run table of epoch seconds read from the MLflow database (epoch 1 holds the
# XLA compile); and the phase times as `name=value` lines: wheels_seconds, unpack_seconds,
# versions_seconds, load_seconds (the pipeline's image read), search_seconds, refit_seconds,
# test_seconds, logging_seconds, pipeline_seconds (the whole pipeline process), total_seconds,
# test_accuracy. With $OUT set (the device machine) it writes $OUT/gpu_check.txt (versions,
# phase times, summary, epoch table), $OUT/gpu_check.log (everything, written as it runs, so
# a run stopped at its limit still returns it) and $OUT/optuna.db, $OUT/mlflow.db.
# Everything else lives in /tmp/gpu (removed at the start); exit status: the pipeline's.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
ROOT=$(pwd)

device=gpu budget="" batch="" per_class=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device=$2; shift 2 ;;
        --time-budget) budget=$2; shift 2 ;;
        --batch-size) batch=$2; shift 2 ;;
        --per-class) per_class=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$device" in
    gpu) : "${budget:=300}" "${batch:=1024}" "${per_class:=0}"; mixed=1 ;;
    cpu) : "${budget:=90}" "${batch:=128}" "${per_class:=60}"; mixed=0 ;;
    *) echo "error: --device must be gpu or cpu" >&2; exit 2 ;;
esac

WORK=/tmp/gpu
rm -rf "$WORK"
mkdir -p "$WORK"
LOG=$WORK/gpu_check.log
[ -n "${OUT:-}" ] && LOG=$OUT/gpu_check.log
exec > >(tee "$LOG") 2>&1   # everything below goes to the terminal and the log
tee_pid=$!
trap 'exec 1>&- 2>&-; wait "$tee_pid" 2>/dev/null || true' EXIT   # let tee finish the log
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
T0=$(now)
echo "gpu_check: device=$device time_budget=$budget batch=$batch" \
     "per_class=$per_class mixed_precision=$mixed ($(date -u +%FT%TZ), $(nproc) cores)"

# 1. wheels
t=$(now)
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    echo "installed $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
fi
wheels_seconds=$(since "$t")

# 2. data
t=$(now)
archives=(.gpudata/*.tar.gz)
mkdir -p "$WORK/data"
tar -xzf "${archives[0]}" -C "$WORK/data"
folders=("$WORK"/data/*/)
dataset=${folders[0]%/}
if [ "$per_class" -gt 0 ]; then   # the first N images of each class, linked into a smaller folder
    small=$WORK/data-small/$(basename "$dataset")
    for d in "$dataset"/*/; do
        mkdir -p "$small/$(basename "$d")"
        # sed, not head: head's early exit would end sort with SIGPIPE, a failure under pipefail
        find "$d" -maxdepth 1 -type f -name '*.jpg' | sort | sed -n "1,${per_class}p" | xargs ln -t "$small/$(basename "$d")"
    done
    dataset=$small
fi
unpack_seconds=$(since "$t")
echo "dataset $dataset: $(find "$dataset" -type f | wc -l) images in $(ls "$dataset" | wc -l) classes"

# 3. card and versions
t=$(now)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null; then :; else echo "card: CPU"; fi
export KERAS_BACKEND=jax PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
python3 - "$device" <<'EOF' | tee "$WORK/versions.txt"
import importlib.metadata as md, platform, sys
import jax, keras
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"
print(f"python {platform.python_version()} ({sys.executable})")
print(" ".join(f"{n} {v(n)}" for n in ("jax", "jaxlib", "jax-cuda13-plugin", "keras", "numpy", "optuna",
                                          "mlflow-skinny", "mlflow-tracing", "sqlalchemy", "pandas", "scikit-learn")))
print(f"keras backend {keras.backend.backend()}; jax backend {jax.default_backend()}; devices {jax.devices()}")
if sys.argv[1] == "gpu" and jax.default_backend() != "gpu":
    sys.exit("error: JAX sees no GPU (its backend is %s); --device cpu rehearses on a CPU" % jax.default_backend())
EOF
versions_seconds=$(since "$t")

# 4. search + refit
cd "$WORK"   # MLflow's artifacts (./mlruns) and the pipeline's outputs land here, not in the tree
export MLFLOW_TRACKING_URI=sqlite:///$WORK/mlflow.db
t=$(now)
status=0
python3 -m pipeline main --backend jax --dataset "$dataset" --search-space "$ROOT/search_spaces/gpu.yaml" \
    --warm-start "$ROOT/search_spaces/gpu_start.yaml" --mixed-precision "$mixed" --batch-size "$batch" \
    --time-budget "$budget" --n-trials 100 --storage "sqlite:///$WORK/optuna.db" --study-name gpu-check \
    --experiment-name gpu-check 2>&1 | tee "$WORK/pipeline.log" || status=$?
pipeline_seconds=$(since "$t")

# 5. what it took
python3 - "$WORK" <<'EOF' > "$WORK/epochs.txt" || echo "(no epoch table: $?)"
import sqlite3, statistics, sys
db = sqlite3.connect(f"{sys.argv[1]}/mlflow.db")
rows = db.execute("SELECT r.name, m.step, m.value FROM metrics m JOIN runs r ON r.run_uuid = m.run_uuid "
                  "WHERE m.key = 'epoch_seconds' ORDER BY r.start_time, m.step").fetchall()
runs = {}
for name, step, value in rows:
    runs.setdefault(name, []).append(value)
print("epoch seconds per run (epoch 1 includes the XLA compile):")
for name, s in runs.items():
    rest = f", later epochs median {statistics.median(s[1:]):.2f} s" if len(s) > 1 else ""
    print(f"  {name}: {len(s)} epochs, first {s[0]:.1f} s{rest}, all {sum(s):.1f} s")
EOF
cat "$WORK/epochs.txt"
load_seconds=$(sed -n 's/^loaded .* in \([0-9.]*\) s$/\1/p' "$WORK/pipeline.log" | tail -1)
{
    cat "$WORK/versions.txt"
    echo "wheels_seconds=$wheels_seconds"
    echo "unpack_seconds=$unpack_seconds"
    echo "versions_seconds=$versions_seconds"
    echo "load_seconds=${load_seconds:-?}"
    grep -E '^(search|refit|test|logging)_seconds=|^test_accuracy=' "$WORK/pipeline.log" || true
    echo "pipeline_seconds=$pipeline_seconds"
    echo "total_seconds=$(since "$T0")"
    echo "pipeline_exit=$status"
    echo
    sed -n "/^study 'gpu-check': [0-9]* trials/,\$p" "$WORK/pipeline.log"
    echo
    cat "$WORK/epochs.txt"
} > "$WORK/gpu_check.txt"
echo "=== gpu_check summary ==="
cat "$WORK/gpu_check.txt"
if [ -n "${OUT:-}" ]; then
    cp "$WORK/gpu_check.txt" "$OUT/gpu_check.txt"
    cp "$WORK/optuna.db" "$WORK/mlflow.db" "$OUT/" 2>/dev/null || true
fi
exit "$status"
