"""Hyper-parameter sweeps with Optuna, scored on validation splits only.

A trial composes the method's config with its sampled parameters, pretrains once per `--seeds` seed (the
run lands in the results store like any other, so a killed trial resumes and a repeated configuration is
reused), and scores the objective (a metric of one protocol on one or more datasets) on their validation
splits; the trial's value is the mean over datasets, seeds and evaluation seeds. While a trial pretrains, the
objective is computed after every epoch and reported to Optuna, whose pruner may stop it. The test split is
sealed for the whole sweep (bench.data.splits.sealed): reading it raises. `--finalize` retrains the best
configuration and evaluates it on test like `bench run`, as the ablation `sweep-<study>`.

Studies live in Optuna storage: by default a journal file in `<results>/sweeps/<study>/` (safe for several
processes on one machine), or any RDB URL (PostgreSQL, MySQL, SQLite) for many machines, where heartbeats
return the trials of dead workers. Workers started with the same command share the study: each claims one
trial at a time and stops once the study holds `--trials` finished, running or queued trials, so together
they run exactly that many. A trial whose worker died (or was interrupted) is queued again with the same
parameters and resumes its pretraining from the checkpoint.

Modules: `spec` (what a study searches and scores), `study` (storage, trials, the workers' loop,
`--finalize`), `outputs` (best.json, trials.csv, plots).
"""
