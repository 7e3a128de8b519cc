"""Optuna studies: one per pipeline, shared by any number of workers, mirrored in MLflow.

- `space`: what a study searches (tune.space), its name, and best_params.json; all the
  training stages need, and it imports no Optuna.
- `storage`: the journal file or PostgreSQL the study lives in, the budget lock, heartbeats,
  and whether a trial's worker lives.
- `mirror`: the MLflow parent run of a study and its nested trial runs.
- `worker`: the objective, the sampler and the loop a worker runs (`run_worker`, `tune`).

Nothing is imported here, so `import pap_severity.tuning.space` stays light.

Distributed tuning on PostgreSQL
--------------------------------
Any number of workers, on any machines that reach the database and hold the same cells (same
content: paths may differ) and params.yaml::

    createdb -h DBHOST -U postgres optuna            # once
    export MLFLOW_TRACKING_URI=http://MLFLOWHOST:5000 # one MLflow for all workers
    # on each machine, as many workers as it has GPUs (or cores):
    pap-severity tune --pipeline combined \\
        --storage postgresql://postgres@DBHOST:5432/optuna &

Each worker takes trials until the study has `tune.n_trials` finished ones, then waits for the
others' running trials and writes `tuning/combined/best_params.json`. Kill any worker at any
time: its trial is failed after `tune.grace_period` seconds (at once for a worker on the same
machine) and re-run by another worker; start a new worker to add capacity. `dvc repro` with
`-S tune.storage=postgresql://...` joins the same study.

Watch a study with optuna-dashboard (an optional extra, not installed by default)::

    pip install optuna-dashboard            # or: pip install -e '.[dashboard]'
    optuna-dashboard postgresql+psycopg2://postgres@DBHOST:5432/optuna
    optuna-dashboard tuning/combined/study.journal   # a journal file: give its path
    # then open http://127.0.0.1:8080: history, intermediate values (the global epoch
    # steps), parameter importances; studies are named <pipeline>-<hash>, and each trial's
    # user attrs name its worker and its MLflow run.
"""
