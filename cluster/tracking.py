"""MLflow for the driver: where runs go, the config as params, resuming the same run."""
from __future__ import annotations

import os
from pathlib import Path

import mlflow

from config import Config

# The user's setting, read once: mlflow.set_tracking_uri() writes MLFLOW_TRACKING_URI into this process's
# environment, which must not leak from one job into the next one run in the same process.
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def tracking_uri(cfg: Config) -> str:
    """tracking.mlflow_uri, else $MLFLOW_TRACKING_URI, else a sqlite store in the output dir.

    (MLflow 3's plain file store is deprecated and raises; sqlite is the embedded default.)
    """
    if cfg.tracking.mlflow_uri:
        return cfg.tracking.mlflow_uri
    if USER_TRACKING_URI:
        return USER_TRACKING_URI
    out = Path(cfg.train.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}"


def use_experiment(cfg: Config, name: str) -> None:
    """Point MLflow at the config's store and experiment ``name`` (created on first use)."""
    mlflow.set_tracking_uri(tracking_uri(cfg))
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; the user's value goes back, so that a process
    # started from this one later (another job, a test's subprocess) chooses its own store
    if USER_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = USER_TRACKING_URI
    if mlflow.get_experiment_by_name(name) is None:
        artifacts = Path(cfg.train.output_dir).resolve() / "mlartifacts"
        # Local stores keep artifacts next to the run outputs; remote servers choose their own.
        local = mlflow.get_tracking_uri().startswith("sqlite")
        mlflow.create_experiment(name, artifact_location=artifacts.as_uri() if local else None)
    mlflow.set_experiment(name)


def start_run(cfg: Config, run_id: str | None = None) -> mlflow.ActiveRun:
    """Open (or, with run_id, reopen) the job's MLflow run; a new run gets the config as params."""
    use_experiment(cfg, cfg.tracking.experiment)
    run = mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.run_name,
                           log_system_metrics=cfg.tracking.system_metrics)
    if run_id is None:
        mlflow.log_params(config_params(cfg))
    return run


def config_params(cfg: Config) -> dict[str, str]:
    """The config flattened to dotted names (MLflow params are flat strings of <= 6000 chars)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = str(value)[:6000]

    walk("", cfg.model_dump())
    return flat
