"""Small teacher and student models, made in code (nothing can be downloaded).

The teacher is a GPT-2-shaped causal LM trained for a bounded wall time on CPU on a synthetic
task whose answers have structure a student can learn and be measured on:

    "reverse: k d a f ="  ->  " f a d k"     (2-4 letters)
    "sort: 4 1 3 ="       ->  " 1 3 4"       (2-5 digits)
    "add: 12 7 ="         ->  " 19"          (0-19 each)

The tokenizer is character-level over printable ASCII plus the specials `<pad>`, `<bos>`, `<eos>`,
`<unk>` and one token per chat role (`<system>`, `<user>`, `<assistant>`), built with `tokenizers`
and wrapped as a `PreTrainedTokenizerFast` with a Jinja chat template; teacher and student share
its bytes, so they share one vocabulary by construction. A quarter of the training examples go
through the chat template, so chat prompts (`messages=[{"role": "user", ...}]`) work too.

`weights_hash` and `tokenizer_hash` identify a model folder ("sha256:<64 hex>"); the teacher on
Triton reports them with every output (deploy/triton/model_repository/teacher/1/model.py imports
them from here) and the trainer refuses a student whose tokenizer hash differs from the teacher's.
Each folder carries `distillery_model.json` (role, maker version, seed, held-out accuracy,
hashes), written last: `ensure_models` reuses a folder only when that marker names the current
`MAKER_VERSION`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import string
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from services.common.logging import get_logger

log = get_logger(__name__)

# Bump when the task, tokenizer, shapes or recipe change: ensure_models then rebuilds.
MAKER_VERSION = "3"
MARKER = "distillery_model.json"

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = ("<system>", "<user>", "<assistant>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
# Printable ASCII without vertical tab, form feed and carriage return.
CHARACTERS = tuple(dict.fromkeys(string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")))

# bos first; each turn opens with its role token; an assistant turn ends with eos.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<{{ message['role'] }}>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

# The names the models report (TEACHER_INFO.model_name; registered in deploy/teachers.yaml).
TEACHER_NAME = "distillery-tiny-teacher"
STUDENT_NAME = "distillery-tiny-student"

# Narrow on purpose: on a 2-core CPU a 64-wide teacher takes ~3x the optimizer steps of a 256-wide
# one in the same wall time, and answers far better after 25-60 s of training.
TEACHER_SHAPE = {"n_layer": 4, "n_embd": 64, "n_head": 4}
STUDENT_SHAPE = {"n_layer": 2, "n_embd": 32, "n_head": 2}
N_POSITIONS = 128

TASKS = ("reverse", "sort", "add")
EVAL_SEED_OFFSET = 1_000_003  # held-out prompts: a seed the training stream never uses


# --- the synthetic task ---------------------------------------------------------------------


def _example(rng: random.Random) -> tuple[str, str]:
    """One (prompt, answer) pair; the answer text without its leading space."""
    task = rng.choice(TASKS)
    if task == "add":
        a, b = rng.randint(0, 19), rng.randint(0, 19)
        return f"add: {a} {b} =", str(a + b)
    if task == "reverse":
        items = [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 4))]
        return f"reverse: {' '.join(items)} =", " ".join(items[::-1])
    items = [rng.choice(string.digits) for _ in range(rng.randint(2, 5))]
    return f"sort: {' '.join(items)} =", " ".join(sorted(items))


def task_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (prompt text, right answer) pairs, the same for the same seed."""
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


def task_prompts(n: int, seed: int = 0, chat_every: int = 5, source: str = "synthetic") -> list[dict]:
    """`n` prompts in the JSON form users push (DESIGN.md s2): every `chat_every`-th one (1 in 5
    by default) as a one-message chat, the others as plain text."""
    prompts = []
    for i, (prompt, _) in enumerate(task_examples(n, seed)):
        task = prompt.split(":", 1)[0]
        body: dict = {"max_new_tokens": 16, "source": f"{source}/{task}", "license": "cc0-1.0"}
        if chat_every and i % chat_every == chat_every - 1:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        prompts.append(body)
    return prompts


def task_answer(prompt_text: str) -> str:
    """The right answer to a task prompt (without the leading space the model emits first).

    Accepts the prompt with or without its trailing "="; raises ValueError for other text.
    """
    task, sep, rest = prompt_text.partition(":")
    task, items = task.strip(), rest.strip().removesuffix("=").split()
    if not sep or task not in TASKS or not items:
        raise ValueError(f"not a task prompt: {prompt_text!r}")
    if task == "add":
        if len(items) != 2:
            raise ValueError(f"add takes two numbers: {prompt_text!r}")
        return str(int(items[0]) + int(items[1]))
    return " ".join(items[::-1] if task == "reverse" else sorted(items))


# --- tokenizer ------------------------------------------------------------------------------


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer shared by teacher and student (left padding, bos added)."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=N_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(model_dir: Path | str) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    return tokenizer


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    """Token ids of a prompt as the served teacher sees it: plain text is bos + text; a list of
    messages goes through the chat template with the assistant turn opened."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- identity -------------------------------------------------------------------------------


def weights_hash(model_dir: Path | str) -> str:
    """"sha256:<hex>" over every `*.safetensors` file of the folder (name and bytes, by name)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def tokenizer_hash(model_dir: Path | str) -> str:
    """"sha256:<hex>" of the folder's `tokenizer.json` in canonical form (keys sorted, no
    whitespace), so re-saving the same tokenizer with other formatting gives the same hash."""
    content = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def read_marker(model_dir: Path | str) -> dict | None:
    """The folder's `distillery_model.json`, or None when absent or unreadable."""
    try:
        return json.loads((Path(model_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def model_name(model_dir: Path | str) -> str:
    """The name a model folder goes by: its marker's model_name, else config.json's
    `_name_or_path`, else the folder name."""
    model_dir = Path(model_dir)
    name = (read_marker(model_dir) or {}).get("model_name")
    if not name:
        try:
            name = json.loads((model_dir / "config.json").read_text()).get("_name_or_path")
        except (OSError, ValueError):
            name = None
    return str(name) if name else model_dir.resolve().name


# --- models ---------------------------------------------------------------------------------


def _gpt2(tokenizer: PreTrainedTokenizerFast, shape: dict, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=N_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **shape,
    )
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _training_batch(
    tokenizer: PreTrainedTokenizerFast, rng: random.Random, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); loss only on the answer and its eos."""
    rows, label_rows = [], []
    for _ in range(batch_size):
        prompt, answer = _example(rng)
        chat = rng.random() < 0.25
        prompt_ids = encode_prompt(tokenizer, [{"role": "user", "content": prompt}] if chat else prompt)
        answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    return input_ids, mask, labels


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train_threads(shape: dict) -> int:
    """Narrow models train faster on one thread (thread sync costs more than the matmuls gain)."""
    return 1 if shape["n_embd"] <= 128 else (os.cpu_count() or 1)


def _train(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    train_seconds: float,
    seed: int,
    batch_size: int = 32,
    peak_lr: float = 3e-3,
) -> dict:
    """Train for `train_seconds` of wall time. The learning rate warms up, then follows a cosine
    over the time budget (the step count is not known in advance)."""
    rng = random.Random(seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    started = time.monotonic()
    step, warmup, loss_ema = 0, 30, None
    while (elapsed := time.monotonic() - started) < train_seconds:
        progress = elapsed / train_seconds
        lr = peak_lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        input_ids, mask, labels = _training_batch(tokenizer, rng, batch_size)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        step += 1
        if step % 200 == 0:
            log.info("teacher_training", step=step, seconds=round(elapsed, 1), loss=round(loss_ema, 4))
    model.eval()
    return {"steps": step, "train_seconds": round(time.monotonic() - started, 2), "final_loss": loss_ema}


@torch.inference_mode()
def exact_match(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    examples: list[tuple[str, str]],
    chat: bool = False,
    batch_size: int = 64,
    max_new_tokens: int = 16,
) -> dict:
    """Greedy-decoding exact-match accuracy (completion stripped == answer), overall and per task."""
    model.eval()
    hits: dict[str, list[int]] = {task: [0, 0] for task in TASKS}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = [encode_prompt(tokenizer, [{"role": "user", "content": p}] if chat else p) for p, _ in chunk]
        width = max(len(r) for r in rows)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for (prompt, answer), ids in zip(chunk, out[:, width:].tolist()):
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id)]
            task = prompt.split(":", 1)[0]
            hits[task][0] += int(tokenizer.decode(ids, skip_special_tokens=True).strip() == answer)
            hits[task][1] += 1
    total = sum(h for h, _ in hits.values()), sum(n for _, n in hits.values())
    return {
        "accuracy": round(total[0] / max(total[1], 1), 4),
        "per_task": {task: round(h / n, 4) for task, (h, n) in hits.items() if n},
        "n": total[1],
    }


def evaluate_model_dir(model_dir: Path | str, n: int = 300, seed: int = EVAL_SEED_OFFSET, chat: bool = False) -> dict:
    """Exact-match accuracy of a saved model on `n` held-out task prompts."""
    model = GPT2LMHeadModel.from_pretrained(str(model_dir))
    return exact_match(model, load_tokenizer(model_dir), task_examples(n, seed), chat=chat)


def _evaluate(model, tokenizer, seed: int, n: int = 300) -> dict:
    held_out = task_examples(n, seed + EVAL_SEED_OFFSET)
    plain = exact_match(model, tokenizer, held_out)
    chat = exact_match(model, tokenizer, held_out[: n // 3], chat=True)
    return {"accuracy": plain["accuracy"], "per_task": plain["per_task"], "eval_n": plain["n"],
            "chat_accuracy": chat["accuracy"]}


def _write_marker(out_dir: Path, info: dict) -> dict:
    info = {
        **info,
        "maker_version": MAKER_VERSION,
        "weights_hash": weights_hash(out_dir),
        "tokenizer_hash": tokenizer_hash(out_dir),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (out_dir / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def _empty_dir(out_dir: Path | str) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def make_teacher(out_dir: Path | str, seed: int = 0, train_seconds: float = 60.0) -> Path:
    """A GPT-2 teacher trained for `train_seconds` of wall time on the task (0: untrained), saved
    into the empty or absent `out_dir` (safetensors + tokenizer + `distillery_model.json`)."""
    out_dir = _empty_dir(out_dir)
    tokenizer = make_tokenizer()
    model = _gpt2(tokenizer, TEACHER_SHAPE, seed)
    info: dict = {"role": "teacher", "model_name": TEACHER_NAME, "seed": seed, "shape": TEACHER_SHAPE,
                  "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer)}
    with _threads(_train_threads(TEACHER_SHAPE)):
        if train_seconds > 0:
            info |= _train(model, tokenizer, train_seconds, seed)
        else:
            info |= {"steps": 0, "train_seconds": 0.0, "final_loss": None}
        info |= _evaluate(model, tokenizer, seed)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    info = _write_marker(out_dir, info)
    log.info("teacher_made", path=str(out_dir), steps=info["steps"], train_seconds=info["train_seconds"],
             accuracy=info["accuracy"], per_task=info["per_task"], chat_accuracy=info["chat_accuracy"])
    return out_dir


def make_student(out_dir: Path | str, teacher_dir: Path | str, seed: int = 0) -> Path:
    """A smaller, untrained GPT-2 with the teacher's tokenizer (same file, so same vocabulary and
    hash), saved into the empty or absent `out_dir`."""
    teacher_dir = Path(teacher_dir)
    out_dir = _empty_dir(out_dir)
    tokenizer = load_tokenizer(teacher_dir)
    model = _gpt2(tokenizer, STUDENT_SHAPE, seed)
    info: dict = {"role": "student", "model_name": STUDENT_NAME, "seed": seed, "shape": STUDENT_SHAPE,
                  "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tokenizer),
                  "teacher_weights_hash": weights_hash(teacher_dir)}
    with _threads(_train_threads(STUDENT_SHAPE)):
        info |= _evaluate(model, tokenizer, seed)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    shutil.copyfile(teacher_dir / "tokenizer.json", out_dir / "tokenizer.json")
    info = _write_marker(out_dir, info)
    log.info("student_made", path=str(out_dir), accuracy=info["accuracy"])
    return out_dir


def _current(model_dir: Path, role: str) -> dict | None:
    marker = read_marker(model_dir)
    if not marker or marker.get("role") != role or marker.get("maker_version") != MAKER_VERSION:
        return None
    return marker


@contextlib.contextmanager
def _locked(root: Path):
    """One builder per models folder at a time (other processes wait on the lock file)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _build_atomically(target: Path, build) -> None:
    """Build into a temporary sibling folder, then swap it in with a rename."""
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_models(root: Path | str, train_seconds: float = 60.0, seed: int = 0) -> tuple[Path, Path]:
    """`(teacher_dir, student_dir)` = `root/teacher`, `root/student`, building only what is absent,
    half-built or from another maker version (a student is also rebuilt when its teacher changed).
    Idempotent, atomic (temp folder + rename) and safe across processes (a lock file)."""
    root = Path(root)
    teacher_dir, student_dir = root / "teacher", root / "student"
    with _locked(root):
        teacher = _current(teacher_dir, "teacher")
        if teacher is None:
            log.info("building_teacher", path=str(teacher_dir), train_seconds=train_seconds)
            _build_atomically(teacher_dir, lambda tmp: make_teacher(tmp, seed=seed, train_seconds=train_seconds))
            teacher = _current(teacher_dir, "teacher")
        student = _current(student_dir, "student")
        if (student is None or student.get("teacher_weights_hash") != teacher["weights_hash"]
                or student.get("tokenizer_hash") != teacher["tokenizer_hash"]):
            log.info("building_student", path=str(student_dir))
            _build_atomically(student_dir, lambda tmp: make_student(tmp, teacher_dir, seed=seed))
    return teacher_dir, student_dir
