"""TRL's dataset inputs beyond a map-style `datasets.Dataset`: a streamed (`IterableDataset`) train set, and
the DataLoaders TRL's trainer exposes (`get_train_dataloader` / `get_eval_dataloader`).

A streamed train set is read as training draws prompts, never held whole: `StreamedPrompts` is the trainer's
prompt dataset and its sampler in one object. Each draw pulls the next rows from the stream, encodes them
(the same checks and chat rendering as PromptDataset) and keeps the last few steps' rows for the collector
and the reward functions; when the stream ends a new pass starts (`set_epoch`, as the HF Trainer does, so
a shuffled stream reshuffles). Its position is the number of rows read in the current pass, so a resumed
run re-reads the stream and skips them (exact for a deterministic stream). TRL shuffles a streamed train set
with `IterableDataset.shuffle(seed)` (a buffered shuffle) unless `shuffle_dataset=False`; so does this.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from dash_fast.data.prompts import DataError, PromptDataset, load_rows


def is_iterable_dataset(obj: Any) -> bool:
    """A `datasets.IterableDataset` (streamed): iterable, with no length and no row indexing."""
    try:
        from datasets import IterableDataset
    except ImportError:  # datasets is a dependency of TRL's inputs only
        return False
    return isinstance(obj, IterableDataset)


def peek_rows(stream: Any, n: int) -> list[dict]:
    """The first `n` rows of a stream (fewer if it is shorter): enough to check its columns up front."""
    rows = []
    for row in stream:
        rows.append(dict(row))
        if len(rows) >= n:
            break
    if not rows:
        raise DataError("train_dataset: the stream has no rows")
    return rows


class StreamedPrompts:
    """A streamed train set as the trainer's prompt dataset (`rows`, `prompt_ids`, `texts`, `columns`) and
    its prompt sampler (`next`, `state_dict`, `load_state_dict`). Indices count rows read since the start of
    the run; only the last `keep` of them stay in memory."""

    def __init__(self, stream: Any, encode: Callable[[dict, int], PromptDataset], keep: int,
                 prompt_column: str = "prompt", adapt: Callable[[dict, int], dict] | None = None) -> None:
        self.stream, self.encode, self.keep, self.adapt = stream, encode, max(keep, 1), adapt
        self.prompt_column = prompt_column
        self.rows: dict[int, dict] = {}
        self.prompt_ids: dict[int, list[int]] = {}
        self.texts: dict[int, str] = {}
        self.columns_seen: set[str] | None = None
        self.epoch, self.offset, self.read = 0, 0, 0  # pass, rows read in this pass, rows read in all
        self._it = None

    def _iterator(self):
        if self._it is None:
            if hasattr(self.stream, "set_epoch"):
                self.stream.set_epoch(self.epoch)
            self._it = iter(self.stream)
        return self._it

    def _pull(self) -> dict:
        try:
            row = next(self._iterator())
        except StopIteration:
            if self.offset == 0:
                raise DataError("train_dataset: the stream has no rows") from None
            self.epoch, self.offset, self._it = self.epoch + 1, 0, None
            row = next(self._iterator())
        self.offset += 1
        return dict(row)

    def next(self, k: int) -> list[int]:
        """Read the next `k` rows; returns their indices."""
        out = []
        for _ in range(k):
            i, row = self.read, self._pull()
            if self.adapt is not None:
                row = self.adapt(row, self.offset - 1)
            if self.columns_seen is None:
                self.columns_seen = set(row)
            elif set(row) != self.columns_seen:
                raise DataError(f"train_dataset: streamed row {self.offset - 1} (pass {self.epoch}) has columns "
                                f"{sorted(row)}, earlier rows {sorted(self.columns_seen)}")
            one = self.encode(row, self.offset - 1)
            self.rows[i], self.prompt_ids[i], self.texts[i] = row, one.prompt_ids[0], one.texts[0]
            self.read += 1
            out.append(i)
        for old in [j for j in self.rows if j < self.read - self.keep]:
            del self.rows[old], self.prompt_ids[old], self.texts[old]
        return out

    def columns(self, indices: list[int], repeat: int = 1) -> dict[str, list]:
        keys = [k for k in self.rows[indices[0]] if k != self.prompt_column]
        return {k: [self.rows[i].get(k) for i in indices for _ in range(repeat)] for k in keys}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "read": self.read}

    def load_state_dict(self, state: dict) -> None:
        """Re-read the stream up to the saved position (the rows skipped are not encoded)."""
        self.epoch, self._it = state["epoch"], None
        self.read = state.get("read", self.read)
        self.offset = 0
        it = self._iterator()
        for _ in range(state["offset"]):
            next(it)
        self.offset = state["offset"]
        self.rows.clear()
        self.prompt_ids.clear()
        self.texts.clear()


class _Rows:
    """Map-style view of rows for a DataLoader (TRL's batches are lists of row dicts: identity collation)."""

    def __init__(self, rows: list[dict], order: list[int]) -> None:
        self.rows, self.order = rows, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> dict:
        return self.rows[self.order[i]]


def _identity(batch: list[dict]) -> list[dict]:
    return batch


def rows_dataloader(rows: list[dict], order: list[int], batch_size: int, num_workers: int):
    """A torch DataLoader yielding lists of row dicts in `order` (each prompt already repeated per generation)."""
    from torch.utils.data import DataLoader

    return DataLoader(_Rows(rows, order), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                      collate_fn=_identity)


class _StreamRows:
    """An iterable-style view of a stream, each row repeated `repeat` times (TRL's repeat_iterable_dataset)."""

    def __init__(self, stream: Any, repeat: int) -> None:
        self.stream, self.repeat = stream, repeat

    def __iter__(self):
        for row in self.stream:
            for _ in range(self.repeat):
                yield dict(row)


def stream_dataloader(stream: Any, repeat: int, batch_size: int):
    """A single-worker DataLoader over a stream (TRL: iterable sets are read by one worker, so that a
    prompt's repeats stay together)."""
    from torch.utils.data import DataLoader, IterableDataset

    class _Iterable(IterableDataset):
        def __iter__(self):
            return iter(_StreamRows(stream, repeat))

    return DataLoader(_Iterable(), batch_size=batch_size, num_workers=0, collate_fn=_identity)


def streamed_prompt_source(stream: Any, config: Any, tokenizer: Any, dataset_format: str, shuffle: bool):
    """A streamed train set as the core's prompt source and sampler (trainer.Extensions.prompts), both the
    one StreamedPrompts reader; shuffled with the seed's buffered shuffle unless `shuffle` is False, as TRL.
    `config` is the run's DashConfig."""
    from dash_fast.data.formats import FORMATS

    a = config
    if shuffle and hasattr(stream, "shuffle"):
        stream = stream.shuffle(seed=a.seed if a.data_seed is None else a.data_seed)
    column = a.prompt_column if dataset_format == "prompt" else "prompt"

    def encode(row: dict, i: int) -> PromptDataset:
        return PromptDataset([row], tokenizer, name=f"train_dataset (streamed row {i})",
                             prompt_column=column, max_prompt_tokens=a.max_prompt_tokens,
                             system_prompt=a.system_prompt, use_chat_template=a.use_chat_template,
                             chat_template_kwargs=a.chat_template_kwargs)

    adapt = None if dataset_format == "prompt" else FORMATS[dataset_format]
    # rows stay in memory for a few steps: the one being trained, one sampled ahead, refill rounds
    keep = a.prompts_per_step * (a.max_refill_rounds + 4)
    reader = StreamedPrompts(stream, encode, keep, prompt_column=column, adapt=adapt)
    return reader, reader


def train_dataloader(train_data: Any, sampler: Any, config: Any, num_workers: int):
    """TRL's train DataLoader: one generation batch per item (each prompt repeated `group_size` times), in the
    order the trainer draws them from now on (a copy of `sampler` is advanced, not the trainer's); a streamed
    train set is read by a single worker, as TRL does."""
    a, G = config, config.group_size
    if isinstance(train_data, StreamedPrompts):
        return stream_dataloader(train_data.stream, G, a.rows_per_step)  # (shuffled as training reads it)
    ahead = copy.deepcopy(sampler)
    draws = -(-sampler.n // a.prompts_per_step)  # one pass over the prompts
    order = [i for _ in range(draws) for i in ahead.next(a.prompts_per_step) for _ in range(G)]
    return rows_dataloader(train_data.rows, order, a.rows_per_step, num_workers)


def eval_dataloader(source: Any, generations: int, batch_size: int, num_workers: int):
    """TRL's eval DataLoader: each prompt repeated `generations` times, `batch_size` rows per batch; a
    streamed eval set is read by one worker."""
    if source is None:
        raise ValueError("Trainer: evaluation requires an eval_dataset.")
    if is_iterable_dataset(source):
        return stream_dataloader(source, generations, batch_size)
    rows = load_rows(source)
    order = [i for i in range(len(rows)) for _ in range(generations)]
    return rows_dataloader(rows, order, batch_size, num_workers)
