"""The learning curve of a run: reward per term during GRPO and held-out IoU, one PNG.

Reads the metric history back from MLflow (so a resumed run plots its whole history) and draws two
panels: left, the mean training reward of each term per GRPO step (reward/*, the G answers of every
prompt of the step) and the held-out reward of the greedy answers (eval/reward); right, the held-out
gIoU (with a band of +- one standard error) and cIoU of the test split (eval/*, greedy answers, mask
IoU), its box IoU and parse-failure rate, and the validation and OOD splits' gIoU (val/*, ood/*), at
the steps where evaluation ran (step 0 = after the warm start).
"""
from __future__ import annotations

from pathlib import Path

REWARD_PREFIX, HELD_OUT_REWARD = "reward/", "eval/reward"
EVAL_KEYS = ("eval/giou_segzero", "eval/ciou_segzero", "eval/box_iou", "eval/parse_failure_rate", "val/giou_segzero",
             "ood/giou_segzero")
LABELS = {"val/giou_segzero": "val gIoU (selects)", "ood/giou_segzero": "OOD gIoU"}
GIOU_SE = "eval/giou_segzero_se"


def metric_history(run_id: str, keys=None) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} sorted by step, for the run's reward/* and eval IoU metrics."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    names = keys or [k for k in client.get_run(run_id).data.metrics
                     if k.startswith(REWARD_PREFIX) or k in EVAL_KEYS or k in (HELD_OUT_REWARD, GIOU_SE)]
    # A step redone after a learner restart is logged again: its newest value is the one that counts.
    newest = lambda points: sorted({m.step: m.value for m in sorted(points, key=lambda m: m.timestamp)}.items())  # noqa: E731
    return {k: newest(client.get_metric_history(run_id, k)) for k in names}


def plot_learning_curve(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """Writes the two-panel PNG to ``path``; returns it. Works headless (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted(k for k in history if k.startswith(REWARD_PREFIX)):
        steps, values = zip(*history[key]) if history[key] else ((), ())
        style = dict(linewidth=2.5, color="black") if key == "reward/total" else dict(linewidth=1.2)
        left.plot(steps, values, label=key[len(REWARD_PREFIX):], **style)
    if history.get(HELD_OUT_REWARD):
        steps, values = zip(*history[HELD_OUT_REWARD])
        left.plot(steps, values, "k--o", label="held-out total (greedy)")
    left.set(xlabel="GRPO step", ylabel="mean reward", title="reward per term (training samples)")
    # below the panel: the weighted total and the 0/1 terms span the whole height
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4)
    for key in EVAL_KEYS:
        if history.get(key):
            steps, values = zip(*history[key])
            line, = right.plot(steps, values, marker="o", label=LABELS.get(key, "test " + key.split("/", 1)[1]),
                               **(dict(color="grey", linestyle=":") if key == "eval/parse_failure_rate" else {}))
            se = dict(history.get(GIOU_SE, ()))
            if key == "eval/giou_segzero" and se:  # +- one standard error of the held-out mean
                band = [(s, v, se[s]) for s, v in zip(steps, values) if s in se]
                right.fill_between([b[0] for b in band], [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                                   color=line.get_color(), alpha=0.25, linewidth=0, label="gIoU +- 1 s.e.")
    right.set(xlabel="GRPO step (0 = after the warm start)", ylabel="IoU / rate", title="held-out (greedy)")
    right.set_ylim(0, 1)
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps the legend below the left panel
    plt.close(fig)
    return path
