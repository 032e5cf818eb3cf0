"""Settings of the student trainer (`distill run trainer`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.common.config import CommonSettings


class TrainerSettings(CommonSettings):
    grpc_port: int = 50052
    # The student to train: a Hugging Face causal-LM folder (same tokenizer as the teacher).
    student_dir: Path = Path(".distill/models/student")
    # Checkpoints land in <runs_dir>/<run_id>/step-XXXXXXXX/; empty runs_dir means <data_dir>/runs.
    runs_dir: Path | None = None
    run_id: str = "default"
    # Optimisation.
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = Field(default=16, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    max_grad_norm: float = 1.0
    epochs_per_shard: int = Field(default=1, ge=1)
    # Loss: weighted mix of forward KL on the teacher's top-k at `temperature` (tail mass kept),
    # reverse KL, generalised JSD(beta) and cross-entropy on the teacher's tokens.
    temperature: float = Field(default=1.0, gt=0)
    forward_kl_weight: float = 1.0
    reverse_kl_weight: float = 0.0
    jsd_weight: float = 0.0
    jsd_beta: float = Field(default=0.5, ge=0, le=1)
    ce_weight: float = 0.5
    # 0: a checkpoint after every shard; N: also every N optimizer steps.
    checkpoint_every_steps: int = Field(default=0, ge=0)
    eval_fraction: float = Field(default=0.1, ge=0, lt=1)
    seed: int = 0
    device: str = "auto"

    def runs_root(self) -> Path:
        return self.runs_dir or self.data_dir / "runs"
