"""Spending a wall-clock budget: the plan (`plan`), the timed probe of an epoch (`probe`), successive
halving on a shared study (`rungs`) and worker processes on this machine (`workers`).

Layers, low to high: `plan` and `rungs` (Optuna and settings only) < `pipeline.study` <
`pipeline.train` < `probe` < `workers` < `pipeline.search` / `pipeline.core`. This package
imports nothing itself, so each module sits at its own layer.
"""
