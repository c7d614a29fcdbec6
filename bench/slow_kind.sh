#!/usr/bin/env bash
# A stand-in for the slower machine kind on a faster one: runs a command, and every process it
# starts, in a cgroup whose CPU quota is a share of this machine's cores (cgroup v1 `cpu`
# controller or cgroup v2 `cpu.max`; needs root and a writable /sys/fs/cgroup).
#
#   bench/slow_kind.sh 0.81 -- make test     # 0.81 CPUs in all, in 10 ms periods
#
# The share is the slow kind's whole-suite CPU seconds over this machine's: the suite's CPU
# (bench/suite_cpu.py) was 1,701 s on machine K (AVX2 only) and 670 s on machine P, so two of K's
# cores do about 2 x 670 / 1,701 = 0.81 of one of P's. A quota is not slower cores: a process
# alone gets up to 0.81 of a core (K gives it a whole slow core), two busy processes 0.4 each
# (as on K), and TensorFlow's threads can be stopped mid-step at a period's end. So it stands in
# for the suite's total (two pytest workers and their processes, CPU-bound), not for one
# process's timing: measured on P, `import tensorflow` took 6.5 s alone and 13.5 s two at once
# inside 0.81 CPUs, against 13 s on K; the suite took 15 min 20 s there, against 17 min 44 s on K.
set -euo pipefail
if [[ $# -lt 3 || $2 != "--" ]]; then
    echo "usage: $0 CPUS -- COMMAND [ARGS...]   (CPUS: a share of this machine's cores, e.g. 0.81)" >&2
    exit 2
fi
cpus=$1
shift 2
period=10000  # microseconds
quota=$(python3 -c "import sys; q = round(float(sys.argv[1]) * $period); assert q >= 1000, 'CPUS too small'; print(q)" "$cpus")
name="slow-kind-$$"
if [[ -d /sys/fs/cgroup/cpu && -w /sys/fs/cgroup/cpu ]]; then  # cgroup v1
    group=/sys/fs/cgroup/cpu/$name
    mkdir "$group"
    echo "$period" > "$group/cpu.cfs_period_us"
    echo "$quota" > "$group/cpu.cfs_quota_us"
elif [[ -f /sys/fs/cgroup/cgroup.controllers ]]; then  # cgroup v2
    group=/sys/fs/cgroup/$name
    mkdir "$group"
    echo "$quota $period" > "$group/cpu.max"
else
    echo "$0: no writable cgroup CPU controller under /sys/fs/cgroup (root needed)" >&2
    exit 1
fi
trap 'rmdir "$group" 2>/dev/null || true' EXIT
echo "slow_kind: $cpus CPUs ($quota us every $period us) in $group" >&2
bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' _ "$group" "$@"
