"""The student trainer's core (no Kafka): streaming KD training shard by shard, evaluation against
the teacher, and checkpoints that record every shard they cover.

Checkpoint layout, `<runs_dir>/<run_id>/step-XXXXXXXX/` (written to a temporary folder, renamed):
  model.safetensors, config.json, tokenizer files   `AutoModelForCausalLM.from_pretrained(dir)`
  optimizer.safetensors + trainer_state.json        AdamW moments, step, samples (no pickle)
  lineage.json                                      run, step, shards (id, sha256, uri, rows) in
                                                    training order, teacher and student identity,
                                                    config, metrics

The checkpoint's tokenizer.json is a byte copy of the student's, so its tokenizer hash stays
the teacher's and a checkpoint can seed a later run. Saving goes to a hidden temporary folder
(fsynced), and a checkpoint of the same step is swapped aside first and removed last, so a crash
leaves either the old or the new folder under the final name, never a half-written one;
leftovers of such a crash are cleaned (or restored) when the next trainer starts.

With `checkpoint_every_steps` N > 0, `train_shard` also saves every N optimizer steps inside a
shard (listed in its stats as "checkpoints"); such a checkpoint records how many micro-batches of
that shard it covers, and a trainer resumed from it continues the shard there (the batch order is
a function of the seed and the step the shard started at), so no batch is trained twice.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.files import fsync_dir
from services.common.logging import get_logger
from services.trainer import data
from services.trainer.losses import DistillationLoss, LossWeights, check_vocab, student_distribution, teacher_distribution

log = get_logger(__name__)

EVAL_CAP = 512  # held-out examples kept for evaluation (the most recent ones)


class TrainConfig(BaseModel):
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 16
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    epochs_per_shard: int = 1
    temperature: float = 1.0
    forward_kl_weight: float = 1.0
    reverse_kl_weight: float = 0.0
    jsd_weight: float = 0.0
    jsd_beta: float = 0.5
    ce_weight: float = 0.5
    checkpoint_every_steps: int = 0
    eval_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    bf16: bool | None = None  # None: on where the device supports it (CUDA with bf16)
    padding_side: Literal["right", "left"] = "right"
    max_length: int | None = None  # None: the model's n_positions / max_position_embeddings


def _tokenizer_hash(model_dir: Path) -> str:
    from services.stack.models import tokenizer_hash

    return tokenizer_hash(model_dir)


class StudentTrainer:
    def __init__(self, student_dir: Path, runs_dir: Path, run_id: str, config: TrainConfig):
        self.config = config
        self.run_dir = Path(runs_dir) / run_id
        self.run_id = run_id
        self.student_dir = Path(student_dir)
        self.device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if config.device == "auto" else config.device))
        self.bf16 = config.bf16 if config.bf16 is not None else (
            self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        torch.manual_seed(config.seed)
        self._clean_leftovers()
        latest = self.latest_checkpoint()
        source = latest or self.student_dir
        self.model = AutoModelForCausalLM.from_pretrained(str(source)).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.student_dir))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.tokenizer_hash = _tokenizer_hash(self.student_dir)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.loss = DistillationLoss(
            LossWeights(config.forward_kl_weight, config.reverse_kl_weight, config.jsd_weight, config.ce_weight),
            temperature=config.temperature, jsd_beta=config.jsd_beta)
        self.step = 0
        self.samples = 0
        self.shards_done: list[dict] = []
        self.held_out: list[data.Example] = []
        self.last_stats: dict = {}
        # The shard being trained when the latest checkpoint was written mid-shard, else None.
        self.in_progress: dict | None = None
        self.last_teacher: dict = {}
        if latest is not None:
            self._resume(latest)
        self.max_len = int(config.max_length or getattr(self.model.config, "n_positions", 0)
                           or getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)

    # -- checkpoints -----------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        if not self.run_dir.exists():
            return []
        return sorted(p for p in self.run_dir.glob("step-*") if p.is_dir() and (p / "lineage.json").exists()
                      and ".tmp" not in p.name)

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def _resume(self, path: Path) -> None:
        state = json.loads((path / "trainer_state.json").read_text())
        lineage = json.loads((path / "lineage.json").read_text())
        self.step, self.samples = int(state["step"]), int(state["samples"])
        self.shards_done = list(lineage["shards"])
        self.in_progress = state.get("in_progress")
        self.last_teacher = dict(lineage.get("teacher") or {})
        tensors = load_file(str(path / "optimizer.safetensors"))
        opt_state = {"state": {}, "param_groups": state["param_groups"]}
        for key, tensor in tensors.items():
            index, name = key.split(".", 1)
            opt_state["state"].setdefault(int(index), {})[name] = tensor.to(self.device) if name != "step" else tensor
        self.optimizer.load_state_dict(opt_state)
        log.info("trainer_resumed", checkpoint=str(path), step=self.step, samples=self.samples,
                 shards=len(self.shards_done))

    def _clean_leftovers(self) -> None:
        """Remove temporary folders of interrupted saves; restore a checkpoint swapped aside by a
        save that died before its replacement was in place."""
        if not self.run_dir.exists():
            return
        for path in sorted(self.run_dir.glob(".step-*.old-*")):
            final = self.run_dir / path.name[1:].split(".old-", 1)[0]
            if final.exists():
                shutil.rmtree(path)
            else:
                os.replace(path, final)
                log.warning("checkpoint_restored", path=str(final))
        for path in self.run_dir.glob(".step-*.tmp-*"):
            log.warning("checkpoint_leftover_removed", path=str(path))
            shutil.rmtree(path)

    def save_checkpoint(self, metrics: dict, teacher: dict) -> Path:
        """Write `<run>/step-<8 digits>/` atomically; the same step saved again replaces it."""
        teacher = dict(teacher or self.last_teacher)
        self.last_teacher = teacher
        final = self.run_dir / f"step-{self.step:08d}"
        tmp = self.run_dir / f".step-{self.step:08d}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.model.save_pretrained(str(tmp), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tmp))
        # Same bytes as the student's tokenizer.json, so the checkpoint's tokenizer hash is unchanged.
        shutil.copyfile(self.student_dir / "tokenizer.json", tmp / "tokenizer.json")
        tensors, groups = {}, self.optimizer.state_dict()
        for index, values in groups["state"].items():
            for name, value in values.items():
                tensors[f"{index}.{name}"] = (value if torch.is_tensor(value) else torch.tensor(value)).detach().cpu().contiguous()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": self.step, "samples": self.samples, "seed": self.config.seed,
             "in_progress": self.in_progress, "param_groups": groups["param_groups"]}, indent=2))
        lineage = {
            "run_id": self.run_id,
            "step": self.step,
            "samples": self.samples,
            "shards": self.shards_done,
            "teacher": teacher,
            "student": {"model_name": self.student_name(), "parameters": sum(p.numel() for p in self.model.parameters()),
                        "vocab_size": len(self.tokenizer), "tokenizer_hash": "sha256:" + self.tokenizer_hash.removeprefix("sha256:"),
                        "base": str(self.student_dir)},
            "config": self.config.model_dump(),
            "metrics": metrics,
            "created_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        }
        (tmp / "lineage.json").write_text(json.dumps(lineage, indent=2))
        _fsync_tree(tmp)
        aside = self.run_dir / f".{final.name}.old-{os.getpid()}"
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
        fsync_dir(self.run_dir)
        if aside.exists():
            shutil.rmtree(aside)
        log.info("checkpoint_saved", path=str(final), step=self.step, shards=len(self.shards_done))
        return final

    def student_name(self) -> str:
        from services.stack.models import model_name

        return model_name(self.student_dir)

    # -- training --------------------------------------------------------------------------------
    def check_teacher(self, vocab_size: int, tokenizer_hash: str) -> None:
        check_vocab(vocab_size, tokenizer_hash, len(self.tokenizer), self.tokenizer_hash)

    def _teacher_from(self, table) -> dict:
        """Teacher identity from a shard's first row (used when none is passed to save_checkpoint)."""
        names = {"teacher_model": "model_name", "teacher_version": "model_version", "teacher_revision": "revision",
                 "teacher_tokenizer_hash": "tokenizer_hash", "teacher_vocab_size": "vocab_size"}
        if table is None or not table.num_rows:
            return {}
        return {out: table.column(col)[0].as_py() for col, out in names.items() if col in table.column_names}

    def _forward(self, batch: dict) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"]).logits
        mask = batch["target"].reshape(-1)
        keep = mask > 0
        vocab = logits.shape[-1]
        return self.loss(
            logits.reshape(-1, vocab)[keep],
            batch["topk_ids"].reshape(-1, batch["topk_ids"].shape[-1])[keep],
            batch["topk_logprobs"].reshape(-1, batch["topk_logprobs"].shape[-1])[keep],
            batch["labels"].reshape(-1)[keep],
            mask[keep],
            capture_temperature=_per_position(batch)[keep],
        )

    def train_shard(self, shard_id: str, sha256: str, uri: str, table) -> dict | None:
        """Train on one shard's rows (its held-out rows kept for evaluation). None when the shard
        (by id, or by sha256 under another id) was trained before: a shard is never trained twice.
        A shard interrupted after a mid-shard checkpoint continues where that checkpoint ended."""
        for done in self.shards_done:
            if done["shard_id"] == shard_id or (sha256 and done.get("sha256") == sha256):
                if done["shard_id"] != shard_id:
                    log.warning("shard_content_already_trained", shard_id=shard_id, sha256=sha256,
                                trained_as=done["shard_id"])
                return None
        started = time.monotonic()
        self.last_teacher = self._teacher_from(table) or self.last_teacher
        resume = self.in_progress if self.in_progress and self.in_progress.get("shard_id") == shard_id else None
        if self.in_progress and resume is None:
            log.warning("in_progress_shard_abandoned", shard_id=self.in_progress.get("shard_id"),
                        micro_batches_done=self.in_progress.get("micro_batches_done"))
        start_step = int(resume["start_step"]) if resume else self.step
        skip = int(resume["micro_batches_done"]) if resume else 0
        record = {"shard_id": shard_id, "sha256": sha256, "uri": uri, "record_count": table.num_rows}
        train, held = data.split(data.examples(table, self.max_len), self.config.eval_fraction)
        self.held_out = (self.held_out + held)[-EVAL_CAP:]
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        count = steps = micro = 0
        accum, every = self.config.grad_accum, self.config.checkpoint_every_steps
        saved: list[str] = []
        for epoch in range(self.config.epochs_per_shard):
            # The order depends on the step the shard started at, not on the current step, so a
            # resumed shard sees the same batches in the same order.
            epoch_batches = data.batches(train, self.config.batch_size, self.pad_id,
                                          self.config.seed + start_step + epoch, self.config.padding_side)
            for group_start in range(0, len(epoch_batches), accum):
                group = epoch_batches[group_start:group_start + accum]
                if micro + len(group) <= skip:  # covered by the mid-shard checkpoint we resumed from
                    micro += len(group)
                    continue
                for batch in group:
                    parts = self._forward(batch)
                    (parts["loss"] / len(group)).backward()
                    for name, value in parts.items():
                        sums[name] = sums.get(name, 0.0) + float(value.detach())
                    count += 1
                micro += len(group)
                self._optimizer_step()
                steps += 1
                if every and self.step % every == 0:
                    self.in_progress = {**record, "start_step": start_step, "micro_batches_done": micro}
                    running = {name: total / max(count, 1) for name, total in sums.items()}
                    saved.append(str(self.save_checkpoint(
                        {"train_loss": running.get("loss", 0.0), "kd_loss": running.get("forward_kl", 0.0),
                         **self.evaluate()}, self.last_teacher)))
                    self.model.train()
        self.in_progress = None
        self.samples += len(train) * self.config.epochs_per_shard
        self.shards_done.append(record)
        elapsed = max(time.monotonic() - started, 1e-9)
        stats = {name: total / max(count, 1) for name, total in sums.items()}
        stats |= {"steps": steps, "train_rows": len(train), "held_out_rows": len(held), "micro_batches": count,
                  "resumed_at_micro_batch": skip, "checkpoints": saved,
                  "seconds": round(elapsed, 3), "steps_per_s": round(steps / elapsed, 2)}
        self.last_stats = stats
        log.info("shard_trained", shard_id=shard_id, step=self.step, **{k: round(v, 4) if isinstance(v, float) else v
                                                                         for k, v in stats.items()})
        return stats

    def _optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    # -- evaluation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def evaluate(self, table=None) -> dict:
        """Token agreement (student argmax == teacher token) and KL(teacher || student) on the rows
        of `table`, or by default on the held-out rows seen so far (never trained on)."""
        items = data.examples(table, self.max_len) if table is not None else self.held_out
        if not items:
            return {"token_agreement": 0.0, "eval_kl": 0.0, "eval_rows": 0}
        self.model.eval()
        agree = total = 0
        kl_sum = 0.0
        for batch in data.batches(items, 64, self.pad_id, 0, self.config.padding_side):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                position_ids=batch["position_ids"]).logits.float()
            keep = batch["target"] > 0
            chosen = logits[keep]
            agree += int((chosen.argmax(-1) == batch["labels"][keep]).sum())
            total += int(keep.sum())
            t_log = teacher_distribution(batch["topk_logprobs"][keep], _per_position(batch)[keep.reshape(-1)], 1.0)
            s_log = student_distribution(chosen, batch["topk_ids"][keep], 1.0)
            kl_sum += float((t_log.exp() * (t_log - s_log)).sum())
        self.model.train()
        return {"token_agreement": agree / max(total, 1), "eval_kl": kl_sum / max(total, 1), "eval_rows": len(items)}


def _per_position(batch: dict) -> torch.Tensor:
    """Each row's capture temperature, repeated over its positions and flattened: [B * L]."""
    return batch["capture_temperature"][:, None].expand_as(batch["target"]).reshape(-1)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with path.open("rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(root)
