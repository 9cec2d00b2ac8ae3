"""TRL's metric names for a dash-fast step, and TRL's `log_history` shape (one entry per `logging_steps`).

TRL's GRPOTrainer accumulates its metrics over the steps between two logs and writes their mean, with
`loss`, `grad_norm`, `learning_rate` and `epoch`; the final entry holds `train_loss`, `train_runtime`, ...
merged with the metrics accumulated since the last log. `log_entries` rebuilds that from dash-fast's
per-step records, which keep dash-fast's own names (`kept_fraction`, `time_*_s`) beside TRL's.
"""

from __future__ import annotations

import math

import torch


def rollout_metrics(prompt_lengths: list[int], rollout, rewards: torch.Tensor, per_func: torch.Tensor,
                    names: list[str], group_size: int, stop_ids: tuple[int, ...], max_new: int) -> dict:
    """TRL's per-step reward and completion metrics for one step's rollout(s).

    `rewards` [B] is the weighted reward, `per_func` [B, F] each reward's value (nan: None)."""
    lengths = rollout.completion_lengths
    last = rollout.completion_ids.gather(1, (lengths - 1).clamp(min=0).view(-1, 1)).view(-1)
    terminated = torch.tensor([n > 0 and t in stop_ids for n, t in zip(lengths.tolist(), last.tolist())])
    clipped = ~terminated & (lengths >= max_new)
    flen = lengths.float()
    term = flen[terminated]
    group_std = rewards.view(-1, group_size).std(dim=1) if len(rewards) % group_size == 0 else rewards.std()
    out = {
        "num_tokens": float(sum(prompt_lengths) + lengths.sum().item()),
        "completions/mean_length": flen.mean().item(),
        "completions/min_length": flen.min().item(),
        "completions/max_length": flen.max().item(),
        "completions/clipped_ratio": clipped.float().mean().item(),
        "completions/mean_terminated_length": term.mean().item() if len(term) else 0.0,
        "completions/min_terminated_length": term.min().item() if len(term) else 0.0,
        "completions/max_terminated_length": term.max().item() if len(term) else 0.0,
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
        "frac_reward_zero_std": (group_std.abs() < 1e-12).float().mean().item(),
    }
    for k, name in enumerate(names):
        col = per_func[:, k]
        ok = col[~col.isnan()]
        out[f"rewards/{name}/mean"] = ok.mean().item() if len(ok) else math.nan
        out[f"rewards/{name}/std"] = ok.std().item() if len(ok) > 1 else (0.0 if len(ok) else math.nan)
    return out


def _mean(records: list[dict]) -> dict:
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r))
    out = {}
    for k in keys:
        vals = [r[k] for r in records if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def _last(records: list[dict]) -> dict:
    """Values TRL logs as they are at log time, not averaged."""
    return {k: records[-1][k] for k in ("epoch", "learning_rate") if k in records[-1]}


def log_entries(records: list[dict], logging_steps: int) -> tuple[list[dict], dict]:
    """(one averaged entry per `logging_steps` steps, the average of the steps after the last one).

    `num_tokens` is cumulative, as TRL logs it; `step` is the last step of the window. `logging_steps=0`
    (logging_strategy="no"): no entries, every step in the final one's average."""
    entries, window, total_tokens = [], [], 0.0
    for r in records:
        total_tokens += r.get("num_tokens", 0.0)
        window.append({**r, "num_tokens": total_tokens})
        if logging_steps and r["step"] % logging_steps == 0:
            entries.append({**_mean(window), **_last(window), "step": r["step"], "num_tokens": total_tokens})
            window = []
    pending = {**_mean(window), **_last(window), "num_tokens": total_tokens} if window else {}
    pending.pop("step", None)
    return entries, pending


def train_log_history(step_records: list[dict], logging_steps: int, logged: list[dict], metrics: dict,
                      epoch: float, step: int) -> list[dict]:
    """TRL's `state.log_history` after train(): the step records' averaged entries (log_entries), the
    entries logged by evaluate() / log() (`logged`) after the train entry of their step, then the final
    entry (`metrics`: train_loss, train_runtime, ..., with the average of the steps since the last log)."""
    entries, pending = log_entries(step_records, logging_steps)
    final = {**pending, **metrics, "epoch": epoch, "step": step}
    ordered = [(e["step"], 0, e) for e in entries] + [(e["step"], 1, e) for e in logged]
    return [e for _, _, e in sorted(ordered, key=lambda t: t[:2])] + [final]


def train_metrics(step_records: list[dict], summary: dict, global_step: int) -> dict:
    """TRL's train() metrics: train_runtime, train_steps_per_second, train_loss (the mean step loss), from the
    step records and the core's run summary."""
    losses = [r["loss"] for r in step_records if isinstance(r.get("loss"), float)]
    runtime = summary["rl_wall_time_s"]
    return {"train_runtime": runtime, "train_steps_per_second": global_step / max(runtime, 1e-9),
            "train_loss": sum(losses) / len(losses) if losses else 0.0, "train_steps": summary["steps"]}
