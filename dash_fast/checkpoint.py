"""Atomic checkpoints and exact resume.

A checkpoint is written into `<dir>.tmp-<pid>`, fsynced, then renamed to `checkpoints/step-N`: a crash
leaves either the old set of checkpoints or the new one, never a half-written `step-N`. Beside the HF
model (for a PeftModel: its adapters, in PEFT format) and tokenizer it holds the resume state: optimizer,
scheduler, prompt sampler, RNG streams, the learner's counters, the logs, and the rollout sampled ahead
with overlap=True (`pending_rollout_state`).

A checkpoint is data, never code: someone else's checkpoint (shared, or from the hub) must not run
anything on `--resume PATH`. So nothing resume reads is a pickle: the resume state is
`resume_state.json` (the tree: dicts, lists, numbers, strings; tuples, non-string keys and numpy arrays
tagged) + `resume_state-NNNNN.safetensors` (its tensors, named from the JSON), the weights are read from
safetensors only (a `pytorch_model.bin` / `adapter_model.bin` is refused, never opened), and a
`trainer_state.pt` of the previous format is read with torch's restricted unpickler (`weights_only=True`,
plus the numpy array types its RNG state needs), which refuses any other callable.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dash_fast.overlap import OverlapScheduler, Prefetched
from dash_fast.runtime import distributed as ddp

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_JSON = "resume_state.json"
STATE_SHARD = re.compile(r"^resume_state-\d{5}\.safetensors$")  # the state's tensors, listed in STATE_JSON
SHARD_BYTES = 1 << 30  # tensors per shard: a CUDA state is copied to host one shard at a time
LEGACY_STATE = "trainer_state.pt"  # the previous format: a pickle, read only with weights_only=True
FORMAT = "dash-fast resume state"
VERSION = 1
TAG = "__dash__"  # marks an encoded value in the JSON; a dict holding this key is itself encoded


class CheckpointError(ValueError):
    """A checkpoint that resume refuses (not plain data, or incomplete); the message is one line."""


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    checkpoints_dir: str,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    trainer_state: dict,
    keep_last: int | None = None,
    state_dict: dict | None = None,
) -> str:
    """Write checkpoints/step-N atomically: HF model + tokenizer + resume state (optimizer, RNG, ...).

    `state_dict` overrides the model's own (FSDP2 passes the gathered full weights)."""
    os.makedirs(checkpoints_dir, exist_ok=True)
    final = os.path.join(checkpoints_dir, f"step-{step}")
    for name in os.listdir(checkpoints_dir):  # leftovers of saves or deletions a kill interrupted
        if name.startswith("."):
            shutil.rmtree(os.path.join(checkpoints_dir, name), ignore_errors=True)
    tmp = os.path.join(checkpoints_dir, f".step-{step}.tmp-{os.getpid()}")
    model.save_pretrained(tmp, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    save_state(trainer_state, tmp)
    _fsync_tree(tmp)
    if os.path.exists(final):  # re-saving the same step (e.g. after a resume): replace it
        _remove(final)
    os.replace(tmp, final)
    _fsync_tree(checkpoints_dir)
    if keep_last:
        for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
            _remove(old)
    return final


def _remove(path: str) -> None:
    """Rename out of sight first, so a kill mid-delete never leaves a half-deleted step-N."""
    hidden = os.path.join(os.path.dirname(path), f".deleting-{os.path.basename(path)}")
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def list_checkpoints(checkpoints_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (temp dirs of interrupted saves are ignored)."""
    if not os.path.isdir(checkpoints_dir):
        return []
    found = []
    for name in os.listdir(checkpoints_dir):
        m = STEP_DIR.match(name)
        path = os.path.join(checkpoints_dir, name)
        if m and (os.path.exists(os.path.join(path, STATE_JSON)) or os.path.exists(os.path.join(path, LEGACY_STATE))):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoints_dir: str) -> str | None:
    found = list_checkpoints(checkpoints_dir)
    return found[-1] if found else None


class _TensorTable:
    """The tensors of a state being encoded, named "0", "1", ... in order: one entry per tensor object (aliases
    stay one); a view of a storage already in the table is copied (safetensors holds no two views of one)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.names: dict[int, str] = {}
        self.storages: set[tuple[torch.device, int]] = set()

    def name(self, obj: torch.Tensor) -> str:
        if id(obj) not in self.names:
            t = obj.detach().contiguous()
            if (t.device, t.untyped_storage().data_ptr()) in self.storages:
                t = t.clone()
            self.storages.add((t.device, t.untyped_storage().data_ptr()))
            self.names[id(obj)] = str(len(self.tensors))
            self.tensors[self.names[id(obj)]] = t
        return self.names[id(obj)]


def _encode(obj: Any, table: _TensorTable, where: str) -> Any:
    """`obj` as JSON-able data, its tensors named in `table`; `where` names it in errors."""
    if isinstance(obj, torch.Tensor):
        return {TAG: "tensor", "name": table.name(obj)}
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        return {TAG: "ndarray", "dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), table, where)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, table, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {TAG: "tuple", "items": items}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and TAG not in obj:
            return {k: _encode(v, table, f"{where}.{k}") for k, v in obj.items()}
        return {TAG: "dict", "items": [[_encode(k, table, where), _encode(v, table, f"{where}[{k!r}]")]
                                       for k, v in obj.items()]}
    raise TypeError(f"resume state: {where} is a {type(obj).__name__}, not plain data (dict, list, tuple, number, "
                    "string, tensor or numpy array)")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    kind = obj.get(TAG)
    if kind is None:
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if kind == "tensor":
        return tensors[obj["name"]]
    if kind == "ndarray":
        return np.array(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in obj["items"])
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["items"]}
    raise CheckpointError(f"resume state: unknown entry {TAG}={kind!r} (written by a newer dash-fast?)")


def save_state(state: dict, folder: str, shard_bytes: int = SHARD_BYTES) -> None:
    """Write `state` as resume_state.json + resume_state-NNNNN.safetensors in `folder` (module docstring).
    Shards of about `shard_bytes`: safetensors holds a file's tensors in host memory while writing it."""
    table = _TensorTable()
    tree = _encode(state, table, "state")
    files: list[str] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for i, (name, t) in enumerate(table.tensors.items()):
        shard[name], size = t.cpu(), size + t.nbytes
        if size >= shard_bytes or i == len(table.tensors) - 1:
            files.append(f"resume_state-{len(files):05d}.safetensors")
            save_file(shard, os.path.join(folder, files[-1]))
            shard, size = {}, 0
    with open(os.path.join(folder, STATE_JSON), "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, "files": files, "state": tree}, f)


def load_trainer_state(path: str) -> dict:
    """The resume state of checkpoint `path`, read as data only: resume_state.json + .safetensors, or a
    previous-format trainer_state.pt through torch's restricted unpickler. Raises CheckpointError (one line)
    on anything else, without running it."""
    if os.path.exists(os.path.join(path, STATE_JSON)):
        with open(os.path.join(path, STATE_JSON)) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
            raise CheckpointError(f"{os.path.join(path, STATE_JSON)}: not a {FORMAT} version {VERSION}")
        tensors: dict[str, torch.Tensor] = {}
        for name in doc["files"]:
            if not isinstance(name, str) or not STATE_SHARD.match(name):
                raise CheckpointError(f"{os.path.join(path, STATE_JSON)}: {name!r} is not a resume_state shard name")
            with _safetensors_only(os.path.join(path, name)):
                tensors.update(load_file(os.path.join(path, name), device="cpu"))
        return _decode(doc["state"], tensors)
    legacy = os.path.join(path, LEGACY_STATE)
    if not os.path.exists(legacy):
        raise CheckpointError(f"{path}: not a dash-fast checkpoint (no {STATE_JSON})")
    return _load_legacy(legacy)


def _load_legacy(file: str) -> dict:
    """A trainer_state.pt of the previous format: plain containers, tensors and numpy's RNG state. Torch's
    weights_only unpickler builds only those (and the numpy array types allowed here); any other global,
    e.g. a pickle calling os.system, is refused before it is called."""
    if tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2]) < (2, 6):  # weights_only escapes before 2.6
        raise CheckpointError(f"{file}: a previous-format checkpoint (a pickle) needs torch >= 2.6 to be read "
                              "safely; resume it with a newer torch, which rewrites it as resume_state.json")
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray  # numpy 2 | numpy 1
    numpy_types = [np.ndarray, np.dtype, np.dtypes.UInt32DType, multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(numpy_types):
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"calls {found.group(1)}" if found else "is not plain data"
        raise CheckpointError(f"refusing {file}: a pickle that {what}, not a dash-fast trainer state (those hold "
                              "only data); resume never runs code from a checkpoint") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: not a dash-fast trainer state (a {type(state).__name__})")
    return state


def load_weights(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fsdp_root=None) -> dict:
    """Load a checkpoint's weights and optimizer state into `model` / `optimizer` (gathered into FSDP2's
    shards under `fsdp_root`); returns its trainer state for the caller to restore the rest."""
    from transformers import AutoModelForCausalLM

    from dash_fast.models.peft import is_peft_model, load_adapter_weights, require_adapter_checkpoint

    state = load_trainer_state(path)
    if is_peft_model(model):  # the checkpoint holds the adapters (PEFT format); the base is the model's own
        require_adapter_checkpoint(path)
        _require_safetensors(path, "adapter_model.safetensors", "adapter_model.bin")
        with _safetensors_only(path):
            load_adapter_weights(path, model)
        optimizer.load_state_dict(state["optimizer"])  # built over the trainable (adapter) parameters only
        return state
    _require_safetensors(path, "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    with _safetensors_only(path):
        saved = AutoModelForCausalLM.from_pretrained(path, dtype=next(model.parameters()).dtype, use_safetensors=True)
    names = [f"model.{n}" for n, p in model.named_parameters() if p.requires_grad]  # FSDPRoot's names
    optim = optimizer_state_for(state["optimizer"], names, optimizer, by_name=fsdp_root is not None, where=path)
    if fsdp_root is None:
        model.load_state_dict(saved.state_dict())
        optimizer.load_state_dict(optim)
    else:
        ddp.load_full_state(fsdp_root, optimizer, saved.state_dict(), optim)
    return state


IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")  # how a step runs, not what it computes


def optimizer_state_for(saved: dict, names: list[str], optimizer: torch.optim.Optimizer, by_name: bool,
                        where: str = "checkpoint") -> dict:
    """A saved optimizer state in the form the loader takes: one process keys it by parameter index
    (Optimizer.state_dict), FSDP2 by parameter name (its full state dict: `names`, the trainable parameters
    in the optimizer's order, under the FSDP root). Either resumes the other's checkpoint; a converted state
    keeps the loading optimizer's implementation flags (fused AdamW in one process, FSDP2's DTensor loop)."""
    groups = saved["param_groups"]
    keys = [k for g in groups for k in g["params"]]
    if all(isinstance(k, str) for k in keys) == by_name:
        return saved
    same = sorted(keys) == list(range(len(names))) if by_name else sorted(keys) == sorted(names)
    if not same or len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{where}: the optimizer state's parameters ({len(keys)} in {len(groups)} groups) are "
                              f"not this model's ({len(names)} trainable in {len(optimizer.param_groups)})")
    index = {n: i for i, n in enumerate(names)}
    to = {i: names[i] for i in keys} if by_name else {n: index[n] for n in keys}
    flags = [{k: g[k] for k in IMPLEMENTATION_KEYS if k in g} for g in optimizer.param_groups]
    return {"state": {to[k]: v for k, v in saved["state"].items()},
            "param_groups": [{**g, **f, "params": [to[k] for k in g["params"]]} for g, f in zip(groups, flags)]}


@contextlib.contextmanager
def _safetensors_only(where: str) -> Iterator[None]:
    """A file named .safetensors that is not one (e.g. a pickle under that name) is refused in one line;
    safetensors' parser reads a JSON header and raw bytes, so nothing in the file is run."""
    try:
        yield
    except SafetensorError as e:
        raise CheckpointError(f"refusing {where}: a file that is not safetensors ({e}); dash-fast checkpoints hold "
                              "their tensors as safetensors only") from None


def _require_safetensors(path: str, name: str, pickled: str, index: str | None = None) -> None:
    """Weights are read from safetensors only: a checkpoint holding `pickled` (a pickle) instead is refused."""
    if os.path.exists(os.path.join(path, name)) or (index and os.path.exists(os.path.join(path, index))):
        return
    found = f" (it holds {pickled}, a pickle, which resume never opens)" if os.path.exists(os.path.join(path, pickled)) else ""
    raise CheckpointError(f"refusing {path}: no {name}{found}; dash-fast checkpoints hold their weights as safetensors")


def pending_rollout_state(overlap: OverlapScheduler | None, distributed: bool) -> dict:
    """A rollout sampled ahead is saved with the state in one process; under torchrun (rank 0 saves)
    it is undone instead: the saved sampler position is the one before its prompts (overlap.py)."""
    job = overlap.pending if overlap is not None else None
    if job is None:
        return {}
    overlap.wait()
    return {"sampler": job.sampler_before} if distributed else {"pending_rollout": job.state_dict()}


def restore_pending_rollout(state: dict, overlap: OverlapScheduler | None, sampler) -> None:
    """Put a saved rollout sampled ahead back in the scheduler; resumed with overlap=False, give its
    prompts back to the sampler instead (they are re-sampled on-policy)."""
    pending = state.get("pending_rollout")
    if pending is not None and overlap is not None:
        overlap.pending = Prefetched.from_state_dict(pending)
    elif pending is not None:
        sampler.load_state_dict(pending["sampler_before"])
