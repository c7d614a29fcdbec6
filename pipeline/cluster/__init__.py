"""`cluster=tcp://host:8786`: the search's `workers` as tasks on a Dask cluster, sharing one study.

    pipeline.cluster.submit   # the submitting process: reach the scheduler, submit, follow the study, stop
    pipeline.cluster.task     # what one task runs on a Dask worker

Each task runs `python -m pipeline search` on the study as a child process of its Dask worker:
the very worker that `workers=N` starts on one machine (pipeline.budget.workers), with
`threads` cores (1 where 0), declared to Dask as the resource `cores`, so that a worker
started with `--resources cores=N` runs N / threads tasks at once. The submitting process
shows the study's progress read from the shared storage; `main` then refits there.

Why a child process per task, rather than the search loop called in the Dask worker's own
process:
- it is the same worker as on one machine, so everything it does holds unchanged: the trial
  heartbeats and the recovery of dead workers' trials (pipeline.recover), the MLflow run per
  trial, pruning inside Keras' fit, the time budget, and failing the running trial on SIGTERM
  (pipeline.interrupts, whose signal handlers only a process's main thread can install: a Dask
  task runs in a thread of the worker);
- stopping it is clean: a Python thread cannot be interrupted (Dask's `cancel` leaves a running
  task running), a process can: the task sends its child SIGTERM, and the trial ends FAIL, its
  run KILLED, as a signalled worker's do;
- TensorFlow's state (its thread pools, sized once per process by `threads`, and its memory)
  stays out of the long-lived Dask worker: each task starts clean;
- a Dask worker that dies takes its child with it (Linux: PR_SET_PDEATHSIG), as a lost machine
  would: the trial's heartbeat stops, the next search worker fails and retries it, and the
  scheduler resubmits the task (`distributed.scheduler.allowed-failures`, 3 by default).
The cost is one Python start and library import per task (about 5 s), not per trial.

The scheduler unpickles the tasks it is given, and the workers run `python -m pipeline`: the
scheduler and every worker need this project and requirements.txt (the same Python 3.11
environment as the submitting machine), and the storage and tracking URI must reach the
study's database and MLflow from every worker. `distributed` is imported only with `cluster`.
"""
