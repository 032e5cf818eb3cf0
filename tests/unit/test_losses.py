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


def test_retempering_is_exact_when_the_top_k_is_the_whole_vocabulary():
    z = torch.tensor([[3.0, 1.0, 0.5, -2.0, 0.0]])
    ids, lp = _teacher_from(z, 5)
    at_two = teacher_distribution(lp, 1.0, 2.0).exp()[0, :5]
    expected = torch.softmax(z / 2.0, -1)[0, ids[0]]
    assert torch.allclose(at_two, expected, atol=1e-4)
    # captured at 2.0 and trained at 2.0: unchanged
    ids2, lp2 = _teacher_from(z / 2.0, 5)
    same = teacher_distribution(lp2, 2.0, 2.0).exp()[0, :5]
    assert torch.allclose(same, torch.softmax(z / 2.0, -1)[0, ids2[0]], atol=1e-5)


def test_capture_temperature_per_row():
    torch.manual_seed(3)
    logits, student = torch.randn(4, 20), torch.randn(4, 20)
    ids, lp = _teacher_from(logits, 6)
    loss = DistillationLoss(LossWeights(1, 0, 0, 0), temperature=2.0)
    temps = torch.tensor([1.0, 1.0, 4.0, 4.0])
    mixed = loss(student, ids, lp, ids[:, 0], torch.ones(4), capture_temperature=temps)["forward_kl"]
    low = loss(student[:2], ids[:2], lp[:2], ids[:2, 0], torch.ones(2), capture_temperature=1.0)["forward_kl"]
    high = loss(student[2:], ids[2:], lp[2:], ids[2:, 0], torch.ones(2), capture_temperature=4.0)["forward_kl"]
    assert mixed.item() == pytest.approx((low.item() + high.item()) / 2, rel=1e-5)
    assert low.item() != pytest.approx(high.item(), rel=1e-3)
    with pytest.raises(ValueError, match="capture_temperature"):
        teacher_distribution(lp, torch.tensor([1.0, 0.0, 1.0, 1.0]), 1.0)


def test_student_tail_is_exact_and_its_gradient_finite_even_for_a_full_top_k():
    torch.manual_seed(4)
    student = torch.randn(3, 12)
    ids, _ = _teacher_from(torch.randn(3, 12), 4)
    s = student_distribution(student, ids, 1.0)
    probs = torch.softmax(student, -1)
    outside = probs.sum(-1) - probs.gather(-1, ids).sum(-1)
    assert torch.allclose(s[:, -1].exp(), outside, atol=1e-6)
    full = torch.randn(2, 6, requires_grad=True)
    ids_full, lp_full = _teacher_from(torch.randn(2, 6), 6)
    out = DistillationLoss(LossWeights(1, 1, 1, 1))(full, ids_full, lp_full, ids_full[:, 0], torch.ones(2))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and torch.isfinite(full.grad).all()


def test_the_tail_bucket_pushes_mass_back_to_the_rest_of_the_vocabulary():
    logits = torch.zeros(1, 10)  # teacher: 0.8 of its mass outside its top-2
    ids, lp = _teacher_from(logits, 2)
    peaked = torch.full((1, 10), -8.0)
    peaked[0, ids[0]] = 5.0
    peaked.requires_grad_(True)
    DistillationLoss(LossWeights(1, 0, 0, 0))(peaked, ids, lp, ids[:, 0], torch.ones(1))["loss"].backward()
    others = [i for i in range(10) if i not in ids[0].tolist()]
    assert (peaked.grad[0, others] < 0).all()  # descending the loss raises the non-top-k logits
    assert (peaked.grad[0, ids[0]] > 0).all()


def test_kd_parts_scale_with_t_squared():
    torch.manual_seed(5)
    logits, student = torch.randn(3, 15), torch.randn(3, 15)
    ids, lp = _teacher_from(logits, 15)
    t = 3.0
    out = DistillationLoss(LossWeights(1, 1, 1, 0), temperature=t)(student, ids, lp, ids[:, 0], torch.ones(3))
    t_log = teacher_distribution(lp, 1.0, t)
    s_log = student_distribution(student, ids, t)
    from services.trainer.losses import forward_kl, reverse_kl
    assert out["forward_kl"].item() == pytest.approx(forward_kl(t_log, s_log).mean().item() * t * t, rel=1e-5)
    assert out["reverse_kl"].item() == pytest.approx(reverse_kl(t_log, s_log).mean().item() * t * t, rel=1e-5)
    assert out["loss"].item() == pytest.approx(
        out["forward_kl"].item() + out["reverse_kl"].item() + out["jsd"].item(), rel=1e-5)


def test_generalized_jsd_bounds_for_any_beta():
    torch.manual_seed(6)
    for beta in (0.1, 0.5, 0.9):
        p = torch.log_softmax(torch.randn(8, 7) * 5, -1)
        q = torch.log_softmax(torch.randn(8, 7) * 5, -1)
        bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
        values = generalized_jsd(p, q, beta)
        assert (values >= -1e-6).all() and (values <= bound + 1e-5).all()
        assert generalized_jsd(p, p, beta).abs().max() < 1e-6
