"""The student trainer's core on a real (tiny) teacher and student: it learns, checkpoints
without pickle, records its shards, resumes, never trains a shard twice, refuses a foreign vocab."""

from __future__ import annotations

import json
import random
import string
from datetime import datetime, timezone

import pytest
import torch
from tokenizers import Regex, Tokenizer, models as tok_models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from distillery.v1 import common_pb2, prompt_pb2, teacher_output_pb2
from services.common.dataset import row_from_output, rows_to_table
from services.common.topk import pack
from services.stack.models import tokenizer_hash  # the identity every teacher output carries
from services.trainer.core import StudentTrainer, TrainConfig
from services.trainer.losses import VocabMismatchError

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def _tokenizer() -> PreTrainedTokenizerFast:
    """A character-level WordLevel tokenizer, built here (nothing is downloaded)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(string.ascii_lowercase + string.digits + " =:+"))}
    core = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.add_special_tokens(SPECIALS)
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def _gpt2(tok, layers: int, width: int, seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=layers, n_embd=width, n_head=2,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny GPT-2 teacher and a tinier student sharing one tokenizer (the same tokenizer.json bytes)."""
    root = tmp_path_factory.mktemp("models")
    tok = _tokenizer()
    dirs = []
    for name, layers, width, seed in (("teacher", 2, 64, 1), ("student", 1, 32, 2)):
        out = root / name
        _gpt2(tok, layers, width, seed).save_pretrained(str(out), safe_serialization=True)
        tok.save_pretrained(str(out))
        dirs.append(out)
    assert tokenizer_hash(dirs[0]) == tokenizer_hash(dirs[1])
    return tuple(dirs)


def _prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(['rev', 'sort'])}: " + " ".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 6))) + " ="
            for _ in range(n)]


def _shard(teacher_dir, n: int, seed: int, k: int = 8):
    """Rows as the sink writes them, from the teacher's own greedy generations and logits."""
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(str(teacher_dir))
    rows = []
    for i, text in enumerate(_prompts(n, seed)):
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        completion = out.sequences[0, len(ids):].tolist()
        lp = torch.log_softmax(torch.stack(out.logits, 1)[0], -1)
        top_lp, top_ids = torch.topk(lp, k, -1)
        message = teacher_output_pb2.TeacherOutput(
            prompt_id=f"s{seed}-{i}", prompt=prompt_pb2.Prompt(text=text), completion="",
            prompt_token_ids=ids, completion_token_ids=completion, topk=pack(top_ids.numpy(), top_lp.numpy()),
            teacher=common_pb2.TeacherIdentity(model_name="t", revision="r",
                                               tokenizer_hash=tokenizer_hash(teacher_dir),
                                               vocab_size=len(tok)))
        rows.append(row_from_output(message, "x", 0, i, datetime.now(timezone.utc)))
    return rows_to_table(rows)


def test_trains_checkpoints_resumes_and_never_repeats_a_shard(models, tmp_path):
    teacher, student = models
    config = TrainConfig(lr=3e-3, batch_size=8, epochs_per_shard=4, eval_fraction=0.2, ce_weight=0.0)
    trainer = StudentTrainer(student, tmp_path / "runs", "r1", config)
    trainer.check_teacher(len(PreTrainedTokenizerFast.from_pretrained(str(teacher))), tokenizer_hash(teacher))
    first, second = _shard(teacher, 40, 1), _shard(teacher, 40, 2)
    before = trainer.evaluate(first)
    stats1 = trainer.train_shard("shard-1", "aa", "file:///s1", first)
    stats2 = trainer.train_shard("shard-2", "bb", "file:///s2", second)
    after = trainer.evaluate(first)
    assert stats1["steps"] > 0 and stats2["steps"] > 0 and all(torch.isfinite(torch.tensor(s["loss"])) for s in (stats1, stats2))
    assert after["eval_kl"] < before["eval_kl"]
    path = trainer.save_checkpoint(after, {"model_name": "t"})
    assert AutoModelForCausalLM.from_pretrained(str(path)) is not None
    assert not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    lineage = json.loads((path / "lineage.json").read_text())
    assert [s["shard_id"] for s in lineage["shards"]] == ["shard-1", "shard-2"]
    assert lineage["shards"][0]["sha256"] == "aa" and lineage["step"] == trainer.step

    again = StudentTrainer(student, tmp_path / "runs", "r1", config)
    assert again.step == trainer.step and again.samples == trainer.samples
    assert again.train_shard("shard-2", "bb", "file:///s2", second) is None
    weights = {k: v.clone() for k, v in again.model.state_dict().items()}
    assert all(torch.equal(weights[k], v) for k, v in trainer.model.state_dict().items())


def test_foreign_vocab_is_refused(models, tmp_path):
    _, student = models
    trainer = StudentTrainer(student, tmp_path / "runs", "r2", TrainConfig())
    with pytest.raises(VocabMismatchError, match="vocab size: teacher 50257"):
        trainer.check_teacher(50257, "sha256:whatever")


def test_batches_align_the_teacher_top_k_with_the_positions_that_predict_each_token(models):
    from services.trainer import data

    teacher, student = models
    table = _shard(teacher, 6, 3)
    rows = table.to_pylist()
    examples = data.examples(table)
    right, left = data.collate(examples, 0, "right"), data.collate(examples, 0, "left")
    for b, row in enumerate(rows):
        prompt, completion, k = row["prompt_token_ids"], row["completion_token_ids"], row["topk_k"]
        positions = right["target"][b].nonzero().flatten().tolist()
        assert positions == list(range(len(prompt) - 1, len(prompt) - 1 + len(completion)))
        assert right["labels"][b, positions].tolist() == completion
        assert right["input_ids"][b, [p + 1 for p in positions]].tolist() == completion
        assert right["topk_ids"][b, positions].flatten().tolist() == row["topk_ids"][:len(completion) * k]
        # left padding moves everything right by the padding, position ids do not move
        pad = left["input_ids"].shape[1] - len(prompt) - len(completion)
        assert left["target"][b].nonzero().flatten().tolist() == [p + pad for p in positions]
        assert left["position_ids"][b, pad:].tolist() == right["position_ids"][b, :len(prompt) + len(completion)].tolist()
    model = AutoModelForCausalLM.from_pretrained(str(student)).eval()
    with torch.no_grad():
        outs = [model(input_ids=x["input_ids"], attention_mask=x["attention_mask"], position_ids=x["position_ids"]).logits
                for x in (right, left)]
    a, b_ = outs[0][right["target"] > 0], outs[1][left["target"] > 0]
    assert torch.allclose(a, b_, atol=1e-4)


def test_checkpoints_replace_the_same_step_keep_the_tokenizer_and_clean_up(models, tmp_path):
    teacher, student = models
    config = TrainConfig(batch_size=8, eval_fraction=0.2)
    trainer = StudentTrainer(student, tmp_path / "runs", "r3", config)
    trainer.train_shard("shard-1", "aa", "file:///s1", _shard(teacher, 16, 4))
    first = trainer.save_checkpoint({"eval_kl": 1.0}, {"model_name": "t"})
    assert tokenizer_hash(first) == tokenizer_hash(student)
    again = trainer.save_checkpoint({"eval_kl": 0.5}, {"model_name": "t"})
    assert again == first and json.loads((again / "lineage.json").read_text())["metrics"] == {"eval_kl": 0.5}
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]
    lineage = json.loads((first / "lineage.json").read_text())
    assert lineage["student"]["tokenizer_hash"].removeprefix("sha256:") == tokenizer_hash(student).removeprefix("sha256:")
    assert lineage["teacher"] == {"model_name": "t"} and lineage["config"]["batch_size"] == 8
    # a crash after swapping the old checkpoint aside and before the rename: restored on start
    (first.parent / f".{first.name}.tmp-123").mkdir()
    first.rename(first.parent / f".{first.name}.old-123")
    resumed = StudentTrainer(student, tmp_path / "runs", "r3", config)
    assert resumed.step == trainer.step and [s["shard_id"] for s in resumed.shards_done] == ["shard-1"]
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]
    # the same bytes under another shard id are not trained again either
    assert resumed.train_shard("shard-1-copy", "aa", "file:///copy", _shard(teacher, 4, 4)) is None


def test_mid_shard_checkpoints_resume_the_shard_without_repeating_a_batch(models, tmp_path):
    teacher, student = models
    config = TrainConfig(lr=3e-3, batch_size=4, grad_accum=2, eval_fraction=0.1, checkpoint_every_steps=2)
    table = _shard(teacher, 40, 5)
    whole = StudentTrainer(student, tmp_path / "runs", "r4", config)
    stats = whole.train_shard("shard-1", "aa", "file:///s1", table)
    assert stats["steps"] >= 3 and len(stats["checkpoints"]) == stats["steps"] // 2
    latest = json.loads((tmp_path / "runs" / "r4" / sorted(p.rsplit("/", 1)[-1] for p in stats["checkpoints"])[-1]
                         / "trainer_state.json").read_text())
    assert latest["in_progress"]["shard_id"] == "shard-1"
    done_micro = latest["in_progress"]["micro_batches_done"]
    assert 0 < done_micro <= stats["micro_batches"]

    # the process "dies" here: a new trainer starts from the mid-shard checkpoint
    resumed = StudentTrainer(student, tmp_path / "runs", "r4", config)
    assert resumed.step == latest["step"] and resumed.shards_done == []
    rest = resumed.train_shard("shard-1", "aa", "file:///s1", table)
    assert rest["resumed_at_micro_batch"] == done_micro
    assert rest["micro_batches"] == stats["micro_batches"] - done_micro
    assert resumed.step == whole.step and resumed.samples == whole.samples
    assert [s["shard_id"] for s in resumed.shards_done] == ["shard-1"]
    for name, value in whole.model.state_dict().items():
        assert torch.allclose(value, resumed.model.state_dict()[name], atol=1e-6), name
    assert resumed.train_shard("shard-1", "aa", "file:///s1", table) is None


def test_evaluation_uses_held_out_rows_only(models, tmp_path):
    teacher, student = models
    trainer = StudentTrainer(student, tmp_path / "runs", "r5", TrainConfig(batch_size=8, eval_fraction=0.3))
    assert trainer.evaluate()["eval_rows"] == 0
    stats = trainer.train_shard("shard-1", "aa", "file:///s1", _shard(teacher, 30, 6))
    result = trainer.evaluate()
    assert result["eval_rows"] == stats["held_out_rows"] > 0
    assert stats["train_rows"] + stats["held_out_rows"] == 30
    assert 0.0 <= result["token_agreement"] <= 1.0 and result["eval_kl"] > 0
