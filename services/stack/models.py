"""Small teacher and student models, made in code (nothing can be downloaded).

The teacher is a GPT-2-shaped causal LM trained for a minute or two on CPU on a synthetic task
whose answers have structure a student can learn and be measured on:

    "reverse: k q a z ="  ->  " z a q k"
    "sort: k q a z ="     ->  " a k q z"
    "add: 12+7 ="         ->  " 19"

The tokenizer is character-level over printable ASCII (plus bos/eos/pad/unk and chat role
tokens), built with `tokenizers` and wrapped as a `PreTrainedTokenizerFast`, so teacher and
student share one vocabulary by construction. A quarter of the training examples are rendered
through the chat template, so chat prompts (`messages=[{"role": "user", ...}]`) work too.

`weights_hash` and `tokenizer_hash` identify a model folder; every teacher output carries them
and the trainer refuses a student whose tokenizer hash differs from the teacher's.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import string
import time
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from services.common.logging import get_logger

log = get_logger(__name__)

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
# Printable ASCII without the form feeds: letters, digits, punctuation, space, tab, newline.
CHARACTERS = tuple(dict.fromkeys(string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")))

# One Jinja template, also saved with the tokenizer: roles as single tokens, eos after each
# assistant turn, bos first.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

COMPLETE_MARKER = ".complete"
REPORT_FILE = "training_report.json"

# The names the models report (TEACHER_INFO.model_name; registered in deploy/teachers.yaml).
TEACHER_NAME = "distillery-tiny-teacher"
STUDENT_NAME = "distillery-tiny-student"

TEACHER_SHAPE = {"n_layer": 4, "n_embd": 192, "n_head": 6}
STUDENT_SHAPE = {"n_layer": 2, "n_embd": 96, "n_head": 4}
N_POSITIONS = 128

TASKS = ("reverse", "sort", "add")
_LETTERS = string.ascii_lowercase


# --- the synthetic task ---------------------------------------------------------------------


def _example(rng: random.Random) -> tuple[str, str]:
    task = rng.choice(TASKS)
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"add: {a}+{b} =", f" {a + b}"
    letters = [rng.choice(_LETTERS) for _ in range(rng.randint(2, 6))]
    answer = letters[::-1] if task == "reverse" else sorted(letters)
    return f"{task}: {' '.join(letters)} =", " " + " ".join(answer)


def synthetic_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (prompt, answer) pairs, the same for the same seed."""
    rng = random.Random(seed)
    return [_example(rng) for _ in range(n)]


def synthetic_prompts(n: int, seed: int = 0) -> list[str]:
    """The prompts of `synthetic_examples(n, seed)`."""
    return [prompt for prompt, _ in synthetic_examples(n, seed)]


def task_prompts(n: int, seed: int = 0, chat_every: int = 5, source: str = "synthetic") -> list[dict]:
    """`n` prompts in the JSON shape users push (DESIGN.md s2); every `chat_every`-th as a chat."""
    prompts = []
    for i, prompt in enumerate(synthetic_prompts(n, seed)):
        task = prompt.split(":", 1)[0]
        body: dict = {"max_new_tokens": 16, "source": f"{source}/{task}", "license": "cc0-1.0"}
        if chat_every and i % chat_every == chat_every - 1:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        prompts.append(body)
    return prompts


def task_answer(prompt: str) -> str:
    """The right answer to a synthetic prompt (for tests and evaluation)."""
    task, rest = prompt.split(":", 1)
    rest = rest.strip().removesuffix("=").strip()
    if task == "add":
        a, b = rest.split("+")
        return f" {int(a) + int(b)}"
    letters = rest.split()
    return " " + " ".join(letters[::-1] if task == "reverse" else sorted(letters))


# --- tokenizer ------------------------------------------------------------------------------


def make_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer shared by teacher and student (left padding)."""
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
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=N_POSITIONS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tokenizer(out_dir: Path | str) -> PreTrainedTokenizerFast:
    """Make the tokenizer and save it (`save_pretrained`) into `out_dir`."""
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(model_dir: Path | str) -> PreTrainedTokenizerFast:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    return tokenizer


# --- identity -------------------------------------------------------------------------------


def weights_hash(model_dir: Path | str) -> str:
    """sha256 over every `*.safetensors` file of the folder (names and bytes, sorted by name)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def tokenizer_hash(model_dir: Path | str) -> str:
    """sha256 of the folder's `tokenizer.json`."""
    return hashlib.sha256((Path(model_dir) / "tokenizer.json").read_bytes()).hexdigest()


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
    return GPT2LMHeadModel(config)


def _render(tokenizer: PreTrainedTokenizerFast, prompt: str, chat: bool) -> list[int]:
    """Token ids of a prompt as the served teacher sees it (plain: bos + text; chat: template)."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _training_batch(
    tokenizer: PreTrainedTokenizerFast, rng: random.Random, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels); loss only on the answer and its eos."""
    rows, label_rows = [], []
    for _ in range(batch_size):
        prompt, answer = _example(rng)
        prompt_ids = _render(tokenizer, prompt, chat=rng.random() < 0.25)
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + answer_ids)
        label_rows.append([-100] * len(prompt_ids) + answer_ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in label_rows])
    return input_ids, mask, labels


def _train(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerFast,
    train_seconds: float,
    seed: int,
    batch_size: int = 64,
    peak_lr: float = 3e-3,
) -> dict:
    """Train for `train_seconds` of wall time; the learning rate follows warmup then a cosine
    over the time budget (not over a step count, which is unknown in advance)."""
    rng = random.Random(seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    started = time.monotonic()
    step, warmup, loss_ema = 0, 50, None
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
    """Greedy-decoding exact-match accuracy, overall and per task."""
    model.eval()
    hits: dict[str, list[int]] = {task: [0, 0] for task in TASKS}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows = [_render(tokenizer, prompt, chat) for prompt, _ in chunk]
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
            hits[task][0] += int(tokenizer.decode(ids, skip_special_tokens=True) == answer)
            hits[task][1] += 1
    total = sum(h for h, _ in hits.values()), sum(n for _, n in hits.values())
    return {
        "accuracy": total[0] / max(total[1], 1),
        "per_task": {task: h / n for task, (h, n) in hits.items() if n},
        "n": total[1],
    }


def evaluate_model_dir(model_dir: Path | str, n: int = 300, seed: int = 12345, chat: bool = False) -> dict:
    """Exact-match accuracy of a saved model on `n` held-out synthetic prompts."""
    model = GPT2LMHeadModel.from_pretrained(str(model_dir))
    return exact_match(model, load_tokenizer(model_dir), synthetic_examples(n, seed), chat=chat)


def model_name(model_dir: Path | str) -> str:
    """The name a model folder goes by: its marker's model_name, else config.json's
    `_name_or_path`, else the folder name."""
    model_dir = Path(model_dir)
    for path, key in ((model_dir / COMPLETE_MARKER, "model_name"), (model_dir / "config.json", "_name_or_path")):
        try:
            value = json.loads(path.read_text()).get(key)
        except (OSError, ValueError):
            continue
        if value:
            return str(value)
    return model_dir.resolve().name


def _save(model: GPT2LMHeadModel, tokenizer_source, out_dir: Path) -> None:
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if isinstance(tokenizer_source, Path):
        # Same bytes as the teacher's, so the tokenizer hashes match by construction.
        load_tokenizer(tokenizer_source).save_pretrained(str(out_dir))
        shutil.copyfile(tokenizer_source / "tokenizer.json", out_dir / "tokenizer.json")
    else:
        tokenizer_source.save_pretrained(str(out_dir))


def _fresh_dir(out_dir: Path | str) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    return out_dir


def _mark_complete(out_dir: Path, info: dict) -> None:
    info = {**info, "weights_hash": weights_hash(out_dir), "tokenizer_hash": tokenizer_hash(out_dir)}
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(info, indent=2, sort_keys=True))


def make_teacher(out_dir: Path | str, train_seconds: float = 60, seed: int = 0) -> Path:
    """A GPT-2 teacher trained for `train_seconds` on the synthetic task (0: untrained, fast).

    Writes `training_report.json` (steps, loss, held-out exact-match accuracy) beside the weights.
    """
    out_dir = _fresh_dir(out_dir)
    tokenizer = make_tokenizer()
    model = _gpt2(tokenizer, TEACHER_SHAPE, seed)
    report: dict = {"role": "teacher", "model_name": TEACHER_NAME, "seed": seed, "shape": TEACHER_SHAPE,
                    "parameters": sum(p.numel() for p in model.parameters())}
    if train_seconds > 0:
        report |= _train(model, tokenizer, train_seconds, seed)
        held_out = synthetic_examples(300, seed + 12345)
        report["eval"] = exact_match(model, tokenizer, held_out)
        report["eval_chat"] = exact_match(model, tokenizer, held_out[:100], chat=True)
        log.info("teacher_trained", **{k: report[k] for k in ("steps", "train_seconds", "final_loss")},
                 accuracy=report["eval"]["accuracy"], per_task=report["eval"]["per_task"],
                 chat_accuracy=report["eval_chat"]["accuracy"])
    else:
        report |= {"steps": 0, "train_seconds": 0.0}
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _save(model, tokenizer, out_dir)
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    _mark_complete(out_dir, report)
    return out_dir


def make_student(out_dir: Path | str, teacher_dir: Path | str, seed: int = 0) -> Path:
    """A smaller, untrained GPT-2 with the teacher's tokenizer (same vocabulary, same bytes)."""
    teacher_dir = Path(teacher_dir)
    out_dir = _fresh_dir(out_dir)
    tokenizer = load_tokenizer(teacher_dir)
    model = _gpt2(tokenizer, STUDENT_SHAPE, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    _save(model, teacher_dir, out_dir)
    _mark_complete(out_dir, {"role": "student", "model_name": STUDENT_NAME, "seed": seed, "shape": STUDENT_SHAPE,
                             "teacher_weights_hash": weights_hash(teacher_dir)})
    return out_dir


def is_complete(model_dir: Path | str) -> bool:
    return (Path(model_dir) / COMPLETE_MARKER).is_file()


def ensure_models(models_dir: Path | str, train_seconds: float = 60, seed: int = 0) -> tuple[Path, Path]:
    """`(teacher_dir, student_dir)` under `models_dir`, building only what is absent or half-built.

    A folder counts as built once its marker file (written last) exists. A student whose
    tokenizer differs from the teacher's is rebuilt.
    """
    models_dir = Path(models_dir)
    teacher_dir, student_dir = models_dir / "teacher", models_dir / "student"
    if not is_complete(teacher_dir):
        log.info("building_teacher", path=str(teacher_dir), train_seconds=train_seconds)
        make_teacher(teacher_dir, train_seconds=train_seconds, seed=seed)
    if not is_complete(student_dir) or tokenizer_hash(student_dir) != tokenizer_hash(teacher_dir):
        log.info("building_student", path=str(student_dir))
        make_student(student_dir, teacher_dir, seed=seed)
    return teacher_dir, student_dir
