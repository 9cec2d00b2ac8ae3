"""GRPOTrainer's arguments checked and loaded as TRL takes them, before the core trainer is built: the
refusals, the default GRPOConfig, reward models, the train rows (a streamed set: its first rows), the model
(loaded by TRL's rules, PEFT applied) and TRL's model options."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from dash_fast.data.prompts import load_rows
from dash_fast.models.loading import check_text_only, load_causal_lm
from dash_fast.models.peft import apply_peft, is_peft_model
from dash_fast.rewards.reward_models import resolve_reward_models
from dash_fast.trl.config import GRPOConfig, loss_warnings, refusal
from dash_fast.trl.data import is_iterable_dataset, peek_rows

logger = logging.getLogger(__name__)


def world_size() -> int:
    """Processes in the run (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def default_args(model: Any) -> GRPOConfig:
    """TRL's GRPOConfig when none is given: output_dir `<model name>-GRPO`."""
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    return GRPOConfig(output_dir=f"{os.path.basename(str(name).rstrip('/')) or 'model'}-GRPO")


def check_optimizers(optimizers: tuple) -> None:
    if optimizers != (None, None):
        raise NotImplementedError("dash-fast does not support optimizers=(...): the trainer builds AdamW "
                                  "and its schedule from the config")


def trl_inputs(model: Any, reward_funcs: Any, args: Any, train_dataset: Any, eval_dataset: Any,
               reward_processing_classes: Any, peft_config: Any):
    """GRPOTrainer's inputs checked and loaded as TRL takes them, before any trainer is built: refusals (no
    reward, no train set, a vision-language model or dataset, sync_ref_model with PEFT), reward models, the
    train rows (a streamed set: its first rows), the model (loaded by TRL's rules, PEFT applied, TRL's model
    options set), TRL's warnings on the loss settings. Returns
    (model, reward functions, their processing classes, rows, whether the train set is streamed)."""
    if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
        raise ValueError("GRPOTrainer: No reward source provided: pass reward_funcs (functions, built-in reward "
                         "names, or reward model ids / models)")
    if train_dataset is None:
        raise ValueError("GRPOTrainer: `train_dataset` is required")
    check_text_only(model, getattr(args, "trust_remote_code", False))  # a VLM: refused before anything loads
    init_kwargs = getattr(args, "model_init_kwargs", None) or {}
    reward_funcs, processing_classes = resolve_reward_models(
        reward_funcs, reward_processing_classes, {k: v for k, v in init_kwargs.items() if k != "device_map"},
        chat_template_kwargs=getattr(args, "chat_template_kwargs", None))
    streamed = is_iterable_dataset(train_dataset)
    if isinstance(args, GRPOConfig):
        _iterable_dataset_settings(args, streamed, eval_dataset)
    # a streamed train set: its first rows are checked (and build the trainer); training reads the stream
    rows = peek_rows(train_dataset, 8) if streamed else load_rows(train_dataset)
    for column in ("image", "images"):
        if rows and column in rows[0]:
            raise ValueError(f"dash-fast does not support train_dataset column {column!r}: vision-language "
                             "inputs (the engines and the training forward take token ids only)")
    if isinstance(model, str):
        model = load_causal_lm(model, args, init_kwargs, peft=peft_config is not None)
    model = apply_peft(model, peft_config, beta=args.beta)
    if getattr(args, "sync_ref_model", False) and is_peft_model(model):
        raise ValueError(refusal("sync_ref_model", True, "with PEFT the reference is the policy's own base weights "
                                 "(adapters disabled), there is no reference copy to sync (TRL refuses it too)"))
    if getattr(args, "mask_truncated_completions", False) and world_size() > 1:
        raise ValueError("dash-fast does not support mask_truncated_completions=True under torchrun: "
                         "each rank sees only its own completions' stop tokens")
    if isinstance(args, GRPOConfig):
        prepare_model(model, args)
        for warning in loss_warnings(args.loss_type, args.importance_sampling_level):
            logger.warning(warning)
    return model, reward_funcs, processing_classes, rows, streamed


def _iterable_dataset_settings(args: GRPOConfig, streamed_train: bool, eval_dataset: Any) -> None:
    """TRL's settings for iterable datasets: `dispatch_batches` must be False (set so), and a streamed train
    set is read by one DataLoader worker (`dataloader_num_workers` forced to 0, with TRL's warning)."""
    evals = eval_dataset.values() if isinstance(eval_dataset, dict) else [eval_dataset]
    if streamed_train or any(is_iterable_dataset(ds) for ds in evals):
        if args.accelerator_config.dispatch_batches:
            raise ValueError("Iterable datasets require `dispatch_batches=False`, but it is set to `True` in "
                             "`accelerator_config`. Please set it to `False`.")
        args.accelerator_config.dispatch_batches = False
    if streamed_train and args.dataloader_num_workers != 0:
        logger.warning("Iterable datasets require `dataloader_num_workers=0` to preserve prompt grouping; overriding "
                       f"the provided value ({args.dataloader_num_workers}).")
        args.dataloader_num_workers = 0


def prepare_model(model: torch.nn.Module, args: GRPOConfig) -> None:
    """TRL's model options, on the model before the trainer is built: disable_dropout, and
    cast_lm_head_to_fp32 (float32 runs only, checked by GRPOConfig: the head already is)."""
    if args.disable_dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    if args.cast_lm_head_to_fp32:
        model.get_output_embeddings().float()


def check_model(model: torch.nn.Module) -> None:
    """TRL's model flags dash-fast refuses: an MoE model's load-balancing loss (output_router_logits)."""
    if getattr(getattr(model, "config", None), "output_router_logits", False):
        raise ValueError("dash-fast does not support output_router_logits=True: the MoE load-balancing loss "
                         "is not added (set model.config.output_router_logits=False)")


def enable_trl_gradient_checkpointing(model: torch.nn.Module, args: Any) -> None:
    """TRL's gradient_checkpointing (activation_checkpointing in transformers 5) on the trainer's model."""
    if isinstance(args, GRPOConfig) and (args.gradient_checkpointing or args.activation_checkpointing):
        kwargs = args.gradient_checkpointing_kwargs or {"use_reentrant": False}  # frozen inputs (LoRA)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
