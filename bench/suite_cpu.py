"""Where the test suite's CPU goes: a pytest plugin that writes, per test, its wall seconds, the
CPU seconds of the pytest process and those of the processes it started and waited for (the
workers, `mlflow run`, servers), one JSON line each; and, run as a script, the summary.

    PYTHONPATH=bench python -m pytest -q -n auto -p suite_cpu     # writes suite_cpu.jsonl
    python bench/suite_cpu.py suite_cpu.jsonl [--top 30]           # total and the costliest tests

`SUITE_CPU_OUT` names the file (default `suite_cpu.jsonl` in the working directory). A test's
fixtures count for the test that first needs them on its pytest worker.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

OUT = os.environ.get("SUITE_CPU_OUT", "suite_cpu.jsonl")


def _cpu(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


try:
    import pytest
except ImportError:  # the summary needs no pytest
    pytest = None

if pytest is not None:
    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        own, children, start = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN), time.monotonic()
        yield
        row = {"test": item.nodeid, "wall": time.monotonic() - start, "self": _cpu(resource.RUSAGE_SELF) - own,
               "children": _cpu(resource.RUSAGE_CHILDREN) - children}
        with open(OUT, "a") as f:
            f.write(json.dumps(row) + "\n")


def summary(path: str, top: int = 30) -> None:
    rows = [json.loads(line) for line in open(path)]
    for row in rows:
        row["cpu"] = row["self"] + row["children"]
    rows.sort(key=lambda r: -r["cpu"])
    print(f"{len(rows)} tests: {sum(r['cpu'] for r in rows):.0f} CPU s ({sum(r['children'] for r in rows):.0f} in "
          f"processes they started), {sum(r['wall'] for r in rows):.0f} wall s")
    for row in rows[:top]:
        print(f"{row['cpu']:7.1f} CPU s {row['wall']:7.1f} wall s  {row['test']}")


if __name__ == "__main__":
    args = sys.argv[1:]
    summary(args[0], int(args[args.index("--top") + 1]) if "--top" in args else 30)
