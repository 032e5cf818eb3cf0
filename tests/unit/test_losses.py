"""KD losses: zero when the student is the teacher, tail mass counted, temperature, masks, bounds."""

import math

import pytest
import torch

from services.trainer.losses import (DistillationLoss, LossWeights, VocabMismatchError, check_vocab,
                                     generalized_jsd, student_distribution, teacher_distribution)


def _teacher_from(logits: torch.Tensor, k: int):
    logprobs = torch.log_softmax(logits, -1)
    top_lp, top_ids = torch.topk(logprobs, k, dim=-1)
    return top_ids, top_lp


def test_zero_when_student_equals_teacher_and_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    ids, lp = _teacher_from(logits, 5)
    labels, mask = ids[:, 0], torch.ones(6)
    loss = DistillationLoss(LossWeights(1, 1, 1, 0))
    same = loss(logits.clone(), ids, lp, labels, mask)
    assert same["forward_kl"].item() == pytest.approx(0, abs=1e-5)
    assert same["reverse_kl"].item() == pytest.approx(0, abs=1e-5)
    assert same["jsd"].item() == pytest.approx(0, abs=1e-5)
    student = torch.randn(6, 50, requires_grad=True)
    other = loss(student, ids, lp, labels, mask)
    assert other["forward_kl"] > 0.01 and other["reverse_kl"] > 0.01
    other["loss"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_tail_mass_is_a_bucket_not_dropped():
    logits = torch.zeros(1, 10)  # uniform: top-2 hold 0.2, the tail 0.8
    ids, lp = _teacher_from(logits, 2)
    t = teacher_distribution(lp, 1.0, 1.0).exp()
    assert t.shape == (1, 3) and t[0, 2].item() == pytest.approx(0.8, abs=1e-5)
    # a student that puts all its mass on the teacher's top-2 is penalised for ignoring the tail
    peaked = torch.full((1, 10), -20.0)
    peaked[0, ids[0]] = 5.0
    loss = DistillationLoss(LossWeights(1, 0, 0, 0))
    assert loss(peaked, ids, lp, ids[:, 0], torch.ones(1))["forward_kl"] > 1.0
    s = student_distribution(peaked, ids, 1.0).exp()
    assert s.sum().item() == pytest.approx(1.0, abs=1e-4)


def test_temperature_flattens_the_teacher():
    ids, lp = _teacher_from(torch.tensor([[4.0, 2.0, 0.0, -1.0]]), 4)
    sharp = teacher_distribution(lp, 1.0, 1.0).exp()
    flat = teacher_distribution(lp, 1.0, 4.0).exp()
    assert flat[0, 0] < sharp[0, 0] and flat.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_mask_ignores_padding():
    torch.manual_seed(1)
    logits, student = torch.randn(4, 30), torch.randn(4, 30)
    ids, lp = _teacher_from(logits, 5)
    loss = DistillationLoss()
    masked = loss(student, ids, lp, ids[:, 0], torch.tensor([1.0, 1.0, 0.0, 0.0]))
    first_two = loss(student[:2], ids[:2], lp[:2], ids[:2, 0], torch.ones(2))
    assert masked["loss"].item() == pytest.approx(first_two["loss"].item(), rel=1e-5)


def test_jsd_is_bounded_by_log2():
    p = torch.log(torch.tensor([[1.0 - 1e-6, 1e-6]]))
    q = torch.log(torch.tensor([[1e-6, 1.0 - 1e-6]]))
    value = generalized_jsd(p, q, 0.5).item()
    assert 0 < value <= math.log(2) + 1e-4


def test_vocab_mismatch_is_refused_clearly():
    check_vocab(100, "sha256:abc", 100, "abc")
    with pytest.raises(VocabMismatchError, match="teacher 50257, student 100"):
        check_vocab(50257, "sha256:abc", 100, "abc")
    with pytest.raises(VocabMismatchError, match="tokenizer hash"):
        check_vocab(100, "sha256:abc", 100, "def")
