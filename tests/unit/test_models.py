"""The synthetic task, the shared tokenizer, model identity hashes and ensure_models (no servers)."""

from __future__ import annotations

import json
import string

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.stack import models
from services.stack.models import (
    BOS, EOS, MARKER, PAD, UNK, encode_prompt, ensure_models, load_tokenizer, make_tokenizer, read_marker,
    task_answer, task_examples, task_prompts, tokenizer_hash, weights_hash,
)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """An untrained teacher and its student (train_seconds=0: fast)."""
    root = tmp_path_factory.mktemp("models")
    return (root, *ensure_models(root, train_seconds=0))


# --- the task -------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, answer", [
    ("reverse: k d a f =", "f a d k"),
    ("reverse: k d a f", "f a d k"),
    ("sort: 4 1 3 =", "1 3 4"),
    ("sort: 9 0 9 1", "0 1 9 9"),
    ("add: 12 7 =", "19"),
    ("add: 0 0", "0"),
])
def test_task_answer(prompt, answer):
    assert task_answer(prompt) == answer


@pytest.mark.parametrize("bad", ["hello", "multiply: 2 3 =", "add: 1 =", "sort: ="])
def test_task_answer_rejects_other_text(bad):
    with pytest.raises(ValueError):
        task_answer(bad)


def test_task_examples_are_seeded_and_answered_right():
    examples = task_examples(200, seed=3)
    assert examples == task_examples(200, seed=3)
    assert examples != task_examples(200, seed=4)
    assert {p.split(":")[0] for p, _ in examples} == set(models.TASKS)
    for prompt, answer in examples:
        assert prompt.endswith(" =") and task_answer(prompt) == answer


def test_task_prompts_are_design_json_with_one_in_five_chats():
    prompts = task_prompts(50, seed=1)
    assert len(prompts) == 50 and prompts == task_prompts(50, seed=1)
    chats = [p for p in prompts if "messages" in p]
    assert len(chats) == 10
    for body in prompts:
        json.dumps(body)  # JSON-able
        assert body["max_new_tokens"] == 16
        assert body["source"].split("/")[0] == "synthetic" and body["source"].split("/")[1] in models.TASKS
        assert ("prompt" in body) != ("messages" in body)
        text = body["prompt"] if "prompt" in body else body["messages"][0]["content"]
        assert body["source"] == f"synthetic/{text.split(':')[0]}"
        task_answer(text)
    for chat in chats:
        assert chat["messages"][0]["role"] == "user" and len(chat["messages"]) == 1


# --- the tokenizer --------------------------------------------------------------------------


def test_tokenizer_specials_and_round_trip(tokenizer):
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (PAD, BOS, EOS, UNK)
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 4
    assert tokenizer.padding_side == "left"
    text = "reverse: k d a f =\n" + string.ascii_letters + string.digits + string.punctuation + " \t"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1, "bos + one token per character"
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(ids) == BOS + text
    assert tokenizer("\u00e9")["input_ids"][1] == tokenizer.unk_token_id, "outside the alphabet: <unk>"


def test_left_padding_batches(tokenizer):
    batch = tokenizer(["sort: 1 =", "add: 12 7 ="], padding=True)
    short, long_ = batch["input_ids"]
    assert len(short) == len(long_) and short[0] == tokenizer.pad_token_id and long_[0] == tokenizer.bos_token_id
    assert batch["attention_mask"][0][: len(long_) - len("sort: 1 =") - 1] == [0] * 2


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "sort: 2 1 ="}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos><user>sort: 2 1 =<assistant>"
    ids = encode_prompt(tokenizer, messages)
    assert ids == [tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<user>"),
                   *tokenizer("sort: 2 1 =", add_special_tokens=False)["input_ids"],
                   tokenizer.convert_tokens_to_ids("<assistant>")]
    assert encode_prompt(tokenizer, "sort: 2 1 =") == tokenizer("sort: 2 1 =")["input_ids"]
    turns = [{"role": "system", "content": "be brief"}, *messages, {"role": "assistant", "content": "1 2"}]
    assert tokenizer.apply_chat_template(turns, tokenize=False) == "<bos><system>be brief<user>sort: 2 1 =<assistant>1 2<eos>"


def test_saved_tokenizer_loads_the_same(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert loaded("add: 12 7 =")["input_ids"] == tokenizer("add: 12 7 =")["input_ids"]
        assert loaded.chat_template == tokenizer.chat_template and len(loaded) == len(tokenizer)


# --- the models and their identity ----------------------------------------------------------


def test_ensure_models_makes_loadable_teacher_and_student(tiny_models):
    _, teacher_dir, student_dir = tiny_models
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert teacher.num_parameters() > 2 * student.num_parameters()
    assert teacher.config.vocab_size == student.config.vocab_size == len(load_tokenizer(teacher_dir))
    for folder in (teacher_dir, student_dir):
        assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.bin"))
    t, s = read_marker(teacher_dir), read_marker(student_dir)
    assert (t["role"], s["role"]) == ("teacher", "student")
    assert t["maker_version"] == s["maker_version"] == models.MAKER_VERSION
    assert s["teacher_weights_hash"] == t["weights_hash"] == weights_hash(teacher_dir)
    assert s["tokenizer_hash"] == t["tokenizer_hash"] == tokenizer_hash(student_dir)
    assert 0.0 <= t["accuracy"] <= 1.0 and "per_task" in t and t["seed"] == 0
    assert models.model_name(teacher_dir) == "distillery-tiny-teacher"


def test_ensure_models_is_idempotent(tiny_models):
    root, teacher_dir, student_dir = tiny_models
    before = {p: p.stat().st_mtime_ns for p in (teacher_dir / MARKER, student_dir / MARKER)}
    assert ensure_models(root, train_seconds=0) == (teacher_dir, student_dir)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not [p for p in root.iterdir() if p.name.startswith(".") and p.name != ".lock"], "no temp folders left"


def test_ensure_models_rebuilds_another_maker_version(tmp_path):
    teacher_dir, student_dir = ensure_models(tmp_path, train_seconds=0)
    marker = read_marker(teacher_dir)
    (teacher_dir / MARKER).write_text(json.dumps({**marker, "maker_version": "old"}))
    (student_dir / "stale-file").write_text("x")
    ensure_models(tmp_path, train_seconds=0, seed=1)  # other weights, as a new training run gives
    assert read_marker(teacher_dir)["maker_version"] == models.MAKER_VERSION
    assert read_marker(teacher_dir)["seed"] == 1
    assert not (student_dir / "stale-file").exists(), "the student is rebuilt with its new teacher"
    assert read_marker(student_dir)["teacher_weights_hash"] == weights_hash(teacher_dir)


def test_half_built_folder_is_rebuilt(tmp_path):
    teacher_dir, _ = ensure_models(tmp_path, train_seconds=0)
    (teacher_dir / MARKER).unlink()  # as if a build had died before its marker
    ensure_models(tmp_path, train_seconds=0)
    assert read_marker(teacher_dir) is not None


def test_weights_hash_is_stable_and_sensitive(tiny_models, tmp_path):
    _, teacher_dir, student_dir = tiny_models
    first = weights_hash(teacher_dir)
    assert first == weights_hash(teacher_dir) and first.startswith("sha256:") and len(first) == 7 + 64
    assert first != weights_hash(student_dir)
    tensors = load_file(teacher_dir / "model.safetensors")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert weights_hash(tmp_path) == first, "same tensors, same bytes, same hash"
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert weights_hash(tmp_path) != first
    with pytest.raises(FileNotFoundError):
        weights_hash(tmp_path / "nothing-here")


def test_tokenizer_hash_is_canonical_and_sensitive(tiny_models, tmp_path):
    _, teacher_dir, _ = tiny_models
    first = tokenizer_hash(teacher_dir)
    content = json.loads((teacher_dir / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps(content, indent=7))
    assert tokenizer_hash(tmp_path) == first, "formatting does not count"
    content["model"]["vocab"]["zz"] = len(content["model"]["vocab"])
    (tmp_path / "tokenizer.json").write_text(json.dumps(content))
    assert tokenizer_hash(tmp_path) != first


def test_trained_teacher_beats_untrained_student(model_dirs):
    """The session's test teacher (trained once per machine) answers better than the student."""
    teacher, student = read_marker(model_dirs[0]), read_marker(model_dirs[1])
    assert teacher["steps"] > 0 and teacher["train_seconds"] > 0
    assert teacher["accuracy"] > student["accuracy"]
    assert student["tokenizer_hash"] == teacher["tokenizer_hash"]
