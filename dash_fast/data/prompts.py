"""Prompt datasets: load JSONL / parquet / HF datasets, check columns, encode prompts, iterate.

Bad rows are reported before any work starts, as one line naming the row and the column.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch


class DataError(ValueError):
    """A dataset problem; the message names the file, row and column."""


def load_rows(source: Any) -> list[dict]:
    """Rows as dicts from a path (.jsonl/.json/.parquet, or a `save_to_disk` folder), an HF Dataset or a list."""
    if isinstance(source, list):
        return [dict(r) for r in source]
    if isinstance(source, str):
        if not os.path.exists(source):
            raise DataError(f"dataset {source!r}: no such file or folder")
        import datasets

        datasets.disable_progress_bars()
        if os.path.isdir(source):
            ds = datasets.load_from_disk(source)
        else:
            ext = source.rsplit(".", 1)[-1].lower()
            kind = {"jsonl": "json", "json": "json", "parquet": "parquet"}.get(ext)
            if kind is None:
                raise DataError(f"dataset {source!r}: expected .jsonl, .json or .parquet")
            try:
                ds = datasets.load_dataset(kind, data_files=source, split="train")
            except Exception as e:  # malformed JSON lines etc.: keep it to one line
                raise DataError(f"dataset {source!r}: could not be read: {str(e).splitlines()[0]}") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return [dict(r) for r in ds]
    if hasattr(source, "__iter__") and hasattr(source, "column_names"):  # datasets.Dataset
        return [dict(r) for r in source]
    raise DataError(f"dataset of type {type(source).__name__} is not supported (path, list or datasets.Dataset)")


def check_columns(rows: list[dict], required: list[str], name: str = "dataset") -> None:
    if not rows:
        raise DataError(f"{name}: has no rows")
    for i, row in enumerate(rows):
        for col in required:
            if col not in row or row[col] is None:
                raise DataError(f"{name}: row {i} has no column {col!r} (columns: {sorted(row)})")
    # a column some rows lack would reach the reward functions as None ("not applicable") unnoticed
    every = set().union(*rows)
    for i, row in enumerate(rows):
        if len(row) < len(every):
            missing = sorted(every - set(row))
            raise DataError(f"{name}: row {i} has no column {missing[0]!r} (other rows have it)")


def render_prompt(tokenizer, prompt: Any, system_prompt: str | None,
                  use_chat_template: bool | None, chat_template_kwargs: dict | None = None) -> tuple[str, bool]:
    """The text the model sees, and whether the chat template rendered it (its text then already holds the
    template's special tokens, BOS included: tokenise it with add_special_tokens=False, as TRL does).

    The template is used for message lists, for every prompt with use_chat_template=True, and for string
    prompts when a system_prompt is set (the string becomes the user message); a system_prompt without a
    template to put it in is refused."""
    is_chat = isinstance(prompt, list)
    if not is_chat and not isinstance(prompt, str):
        raise DataError(f"a prompt must be a string or a list of messages, got {type(prompt).__name__}")
    templated = bool(use_chat_template) or (use_chat_template is None and (is_chat or system_prompt is not None))
    if not templated:
        if system_prompt is not None:
            raise DataError("system_prompt is applied through the chat template, and use_chat_template=False")
        return prompt, False
    messages = prompt if is_chat else [{"role": "user", "content": str(prompt)}]
    if system_prompt and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    if getattr(tokenizer, "chat_template", None) is None:
        why = "system_prompt needs" if system_prompt is not None and not is_chat else "chat prompts need"
        raise DataError(f"{why} a tokenizer with a chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **(chat_template_kwargs or {})), True


class PromptDataset:
    """Rows with their encoded prompts, checked up front."""

    def __init__(
        self,
        rows: list[dict],
        tokenizer,
        *,
        prompt_column: str = "prompt",
        required_columns: tuple[str, ...] = (),
        max_prompt_tokens: int | None = None,
        system_prompt: str | None = None,
        use_chat_template: bool | None = None,
        chat_template_kwargs: dict | None = None,
        name: str = "dataset",
    ) -> None:
        check_columns(rows, [prompt_column, *required_columns], name)
        self.rows = rows
        self.prompt_column = prompt_column
        self.texts: list[str] = []
        self.prompt_ids: list[list[int]] = []
        for i, row in enumerate(rows):
            try:
                text, templated = render_prompt(tokenizer, row[prompt_column], system_prompt, use_chat_template,
                                                chat_template_kwargs)
            except DataError as e:
                raise DataError(f"{name}: row {i}, column {prompt_column!r}: {e}") from None
            ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]  # no second BOS after a template
            if not ids:
                raise DataError(f"{name}: row {i} has an empty prompt")
            if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
                raise DataError(
                    f"{name}: row {i}: prompt has {len(ids)} tokens > max_prompt_tokens={max_prompt_tokens}"
                )
            self.texts.append(text)
            self.prompt_ids.append(ids)

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self, indices: list[int], repeat: int = 1) -> dict[str, list]:
        """Dataset columns (all but the prompt) for the given rows, each repeated `repeat` times."""
        keys = [k for k in self.rows[indices[0]] if k != self.prompt_column]
        return {k: [self.rows[i].get(k) for i in indices for _ in range(repeat)] for k in keys}


class PromptSampler:
    """Passes over a dataset with a resumable position (epoch, offset): each pass in an order shuffled by
    (seed, epoch), or in dataset order with `shuffle=False` (TRL's shuffle_dataset=False)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < k:
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(k - len(out), self.n - self.offset)
            out += self._order[self.offset : self.offset + take]
            self.offset += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._permutation()


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, width] token ids and 0/1 attention mask, each row's tokens first."""
    return _pad(seqs, pad_id, left=False)


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, width] token ids and 0/1 attention mask, each row's tokens last (prompts: every row's next
    token is at column `width`)."""
    return _pad(seqs, pad_id, left=True)


def _pad(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


def unique_prompts(prompt_ids: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """Distinct prompts (first-seen order) and, per row, the index of its prompt among them. GRPO samples
    each prompt G times: prefilling it once cuts the prefill work by G (vLLM calls this prefix caching)."""
    first: dict[tuple[int, ...], int] = {}
    row_prompt = [first.setdefault(tuple(p), len(first)) for p in prompt_ids]
    unique = [list(k) for k in first]
    return unique, torch.tensor(row_prompt, dtype=torch.long)
