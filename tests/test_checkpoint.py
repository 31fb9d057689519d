"""cluster.checkpoint: checkpoints are kept per run; pruning never deletes the one just written nor
another run's; ``latest`` always names a complete checkpoint."""
import pytest

from cluster import checkpoint


def write(out, run_id, step, keep=2):
    return checkpoint.save(out, run_id, step, lambda d: (d / "rank0.bin").write_text(f"{run_id} {step}"),
                           {"step": step, "mlflow_run_id": run_id}, keep)


def steps_of(out, run_id):
    return sorted(p.name for p in (out / "checkpoints" / run_id).iterdir())


def test_a_second_run_never_prunes_the_first_or_its_own_newest(tmp_path):
    for step in (10, 20, 30):
        write(tmp_path, "first", step)
    assert steps_of(tmp_path, "first") == ["step_000020", "step_000030"]
    # A new run in the same output dir writes step 1 while the first run's higher steps are still there:
    # by name order its step 1 would be the oldest and be pruned at once.
    path = write(tmp_path, "second", 1)
    assert path.exists() and (path / "driver.pt").exists()
    assert steps_of(tmp_path, "first") == ["step_000020", "step_000030"]
    assert checkpoint.resolve("", tmp_path) == path
    write(tmp_path, "second", 2)
    write(tmp_path, "second", 3)
    assert steps_of(tmp_path, "second") == ["step_000002", "step_000003"]
    assert steps_of(tmp_path, "first") == ["step_000020", "step_000030"]


def test_pruning_keeps_the_most_recently_written_even_after_a_resume_from_earlier(tmp_path):
    for step in (1, 2, 3):
        write(tmp_path, "run", step)
    # --resume PATH from step 2 (step 3 is an abandoned future): the next checkpoint, step 3 again,
    # replaces it; then step 4; the two most recently written survive.
    write(tmp_path, "run", 3)
    write(tmp_path, "run", 4, keep=2)
    assert steps_of(tmp_path, "run") == ["step_000003", "step_000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "run/step_000004"
    assert checkpoint.load_driver_state(checkpoint.resolve("", tmp_path))["step"] == 4


def test_keep_one_and_resolve_errors(tmp_path):
    write(tmp_path, "run", 1, keep=1)
    last = write(tmp_path, "run", 2, keep=1)
    assert steps_of(tmp_path, "run") == ["step_000002"]
    assert checkpoint.resolve(str(last), tmp_path) == last
    assert checkpoint.resolve(str(tmp_path / "checkpoints"), "/nowhere") == last
    (tmp_path / "checkpoints" / "latest").write_text("run/step_000009")
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        checkpoint.resolve("", tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        checkpoint.resolve("", tmp_path / "empty")
