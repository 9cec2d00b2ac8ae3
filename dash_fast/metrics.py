"""Run metrics: the step record and summary builders, metrics.jsonl (one object per optimizer step),
TensorBoard events, plots at the end."""

from __future__ import annotations

import json
import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class MetricsLogger:
    def __init__(self, output_dir: str, report_to: list[str], append: bool = False) -> None:
        self.output_dir = output_dir
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if not append and os.path.exists(self.path):
            os.remove(self.path)
        self.writer = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self.wandb = None
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ImportError("report_to includes 'wandb' but wandb is not installed: pip install wandb") from None
            self.wandb = wandb.init(dir=output_dir)

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.writer is not None:
            for k, v in numbers.items():
                if math.isfinite(v):
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records past the checkpoint so the file holds each step once."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(output_dir: str) -> list[str]:
    """plots/{reward,accuracy,kept_fraction,time_split}.png from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(os.path.join(output_dir, "metrics.jsonl")) if "reward_mean" in r]
    plots_dir = os.path.join(output_dir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    steps = [r["step"] for r in records]
    written = []

    def save(name: str, series: dict[str, list], ylabel: str, stacked: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if stacked:
            ax.stackplot(steps, *series.values(), labels=list(series))
        else:
            for label, ys in series.items():
                xs = [s for s, y in zip(steps, ys) if y is not None]
                ax.plot(xs, [y for y in ys if y is not None], label=label, marker="." if len(xs) < 30 else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(plots_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    save("reward", {"reward_mean": [r["reward_mean"] for r in records]}, "reward")
    save("accuracy", {"train accuracy": [r["accuracy"] for r in records],
                      "eval accuracy": [r.get("eval_accuracy") for r in records]}, "accuracy")
    save("kept_fraction", {"kept_fraction": [r["kept_fraction"] for r in records]}, "kept rows / sampled rows")
    split = {"generate": [r["time_generate_s"] for r in records],
             "reward": [r.get("time_reward_s", 0.0) for r in records],
             "train": [r["time_train_s"] for r in records]}
    if any("time_refill_s" in r for r in records):  # refill=True: extra generate + reward rounds
        split["refill"] = [r.get("time_refill_s", 0.0) for r in records]
    save("time_split", split, "seconds per step", stacked=True)
    return written


def step_record(batch, kept, train_stats: dict, reward_names: list[str], accuracy_index: int, lr: float,
                time_train_s: float, time_step_s: float) -> dict:
    """The metrics.jsonl record of one trained step (`batch` a collect.Batch, `kept` the filter's rows).

    "accuracy" is the mean of the accuracy reward (`accuracy_reward`, default the first reward function)
    over the rows where it applies; "rewards/<name>" is each function's mean."""
    import torch

    rewards, per_func, lengths = batch.rewards, batch.per_func, batch.lengths.float()
    acc = per_func[:, accuracy_index]
    record = {
        "step": batch.step,
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "accuracy": torch.nanmean(acc).item() if not acc.isnan().all() else float("nan"),  # accuracy reward mean
        "kept_fraction": kept.numel() / len(rewards),
        "completion_len_mean": lengths.mean().item(),
        "time_generate_s": batch.time_generate_s,
        "rollout_lag": batch.lag,
        "time_reward_s": batch.time_reward_s,
        "time_train_s": time_train_s,
        "time_step_s": time_step_s,
        "tokens_per_s": float(lengths.sum()) / max(time_step_s, 1e-9),
        "lr": lr,
        **batch.refill,
        **train_stats,
    }
    for k, name in enumerate(reward_names):
        record[f"rewards/{name}"] = torch.nanmean(per_func[:, k]).item()
    return record


LOGP_DIFF_MEAN = "sampling/sampling_logp_difference/mean"
LOGP_DIFF_MAX = "sampling/sampling_logp_difference/max"
IS_RATIO_MIN = "sampling/importance_sampling_ratio/min"
IS_RATIO_MEAN = "sampling/importance_sampling_ratio/mean"
IS_RATIO_MAX = "sampling/importance_sampling_ratio/max"


class LogpDifference:
    """|trainer log-prob - sampler log-prob| over completion tokens, under TRL's names (LOGP_DIFF_*).

    With one epoch and one minibatch the trainer skips the old-log-prob pass and takes the sampler's
    log-probs as the old policy's; that holds only while the two agree, which this measures: from the old
    pass when one runs, else from the loss forward of the step's first optimizer step (its per-token
    `stats["logp"]`, before any weight moves), so it costs no extra forward.

    `importance_sampling=True` (the loss applies sampler importance sampling) also records TRL's
    `sampling/importance_sampling_ratio/{min,mean,max}` (IS_RATIO_*) of the ratios given to `add_ratio`: one
    per token (token modes) or per row (sequence modes), as TRL."""

    def __init__(self, importance_sampling: bool = False) -> None:
        self.importance_sampling = importance_sampling
        self.reset()

    def reset(self) -> None:
        self.total, self.count, self.largest = 0.0, 0, 0.0
        self.r_total, self.r_count, self.r_min, self.r_max = 0.0, 0, math.inf, -math.inf

    def add(self, trainer: torch.Tensor, sampler: torch.Tensor) -> None:
        """Flat per-token log-probs of the same tokens (trainer's, sampler's)."""
        if trainer.numel() == 0:
            return
        d = (trainer.detach().double() - sampler.to(trainer.device).double()).abs()
        self.total += float(d.sum())
        self.count += d.numel()
        self.largest = max(self.largest, float(d.max()))

    def add_ratio(self, ratios: torch.Tensor) -> None:
        """Importance-sampling ratios the loss applied (flat)."""
        if ratios.numel() == 0:
            return
        r = ratios.detach().double()
        self.r_total += float(r.sum())
        self.r_count += r.numel()
        self.r_min, self.r_max = min(self.r_min, float(r.min())), max(self.r_max, float(r.max()))

    def record(self, reduce_sum=lambda v: v, reduce_max=lambda v: v) -> dict:
        """{mean, max} over every measured token (`reduce_*`: the sums over ranks); nan when none was."""
        total, count, largest = reduce_sum(self.total), reduce_sum(float(self.count)), reduce_max(self.largest)
        out = {LOGP_DIFF_MEAN: total / count if count else math.nan, LOGP_DIFF_MAX: largest if count else math.nan}
        if self.importance_sampling:
            r_total, r_count = reduce_sum(self.r_total), reduce_sum(float(self.r_count))
            r_min, r_max = -reduce_max(-self.r_min), reduce_max(self.r_max)
            out.update({IS_RATIO_MIN: r_min if r_count else math.nan,
                        IS_RATIO_MEAN: r_total / r_count if r_count else math.nan,
                        IS_RATIO_MAX: r_max if r_count else math.nan})
        return out


def skipped_record(step: int, time_generate_s: float, time_step_s: float, lr: float) -> dict:
    """The record of a step whose batch was skipped (a reward function failed, on_reward_error=skip)."""
    nan = float("nan")
    return {"step": step, "reward_mean": nan, "reward_std": nan, "accuracy": nan, "kept_fraction": 0.0,
            "completion_len_mean": nan, "time_generate_s": time_generate_s,
            "time_reward_s": time_step_s - time_generate_s, "time_train_s": 0.0, "time_step_s": time_step_s,
            "tokens_per_s": 0.0, "lr": lr, "skipped_steps": 1, "reward_error": True}


class ProgressBar:
    """tqdm's bar over the run's steps, showing the last step's reward, kept fraction and accuracy; nothing when
    not `enabled` (disable_tqdm, or not rank 0)."""

    def __init__(self, total: int, initial: int, enabled: bool = True) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="dash-fast RL", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(reward=f"{record['reward_mean']:.3f}", kept=f"{record['kept_fraction']:.2f}",
                                 acc=f"{record['accuracy']:.3f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def no_signal_stats(importance_sampling: bool) -> dict:
    """The training statistics of a step with no signal (no kept row carries an advantage, no KL or entropy
    term): no forward, backward or optimizer step ran. The same keys as a trained step's, nothing measured
    (nan) for the sampler vs trainer log-probs."""
    return {"loss": 0.0, "clip_fraction": 0.0, "kl": 0.0, "entropy": 0.0, "grad_norm": 0.0, "skipped_steps": 0,
            "optimizer_steps": 0, "no_signal": 1, "time/sync_weights": 0.0,
            **LogpDifference(importance_sampling=importance_sampling).record()}


def run_summary(steps: int, finished: bool, records: list[dict], eval_history: list[dict], wall_time_s: float,
                config: dict) -> dict:
    """summary.json: the run's length, evaluations and mean step figures."""
    return {
        "steps": steps,
        "finished": finished,
        # (GRPOTrainer's evaluations are TRL's metrics: no accuracy / examples)
        "eval_accuracy_initial": eval_history[0].get("accuracy") if eval_history else None,
        "eval_accuracy_final": eval_history[-1].get("accuracy") if eval_history else None,
        "eval_examples": eval_history[-1].get("examples", 0) if eval_history else 0,
        "eval_history": eval_history,
        "rl_wall_time_s": wall_time_s,
        "step_time_mean_s": sum(r["time_step_s"] for r in records) / max(len(records), 1),
        "kept_fraction_mean": sum(r["kept_fraction"] for r in records) / max(len(records), 1),
        "config": config,
    }


def write_summary(output_dir: str, summary: dict, plots: bool = True) -> None:
    """summary.json, and the plots of metrics.jsonl when there are records."""
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if plots:
        plot_run(output_dir)
