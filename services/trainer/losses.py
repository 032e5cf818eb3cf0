"""Knowledge-distillation losses on the teacher's top-k log-probabilities.

The teacher sends, per generated token, its k most likely ids with log-probabilities over the
whole vocabulary (captured at temperature `capture_temperature`, normally 1.0), so the mass
outside the top-k is known: tail = 1 - sum(top-k probabilities). Every loss here compares the two
distributions on k+1 outcomes - the k ids, and "everything else" - so the tail is neither
dropped nor silently renormalised away. The student's tail is 1 - the sum of its probabilities on
the teacher's k ids.

The student's tail is computed exactly, as a log-sum-exp over its logits outside the teacher's k
ids (not as log(1 - sum), which loses precision and gradient when the tail is small).

Temperature: the teacher's log-probabilities are re-tempered from the capture temperature Tc to
the training temperature T: p_T(i) ∝ p_Tc(i) ** (Tc / T), exact on the top-k up to the shared
normaliser, which is recomputed with the tail taken as one bucket (a lower bound on the true
tail when T > Tc; exact when T == Tc, the default). Tc may differ per row (a tensor). The
student's logits are divided by T. The KL and JSD parts are scaled by T^2, as usual, so
gradients keep their size across temperatures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.common.files import same_digest

EPS = 1e-8
# log of the smallest student tail mass that still counts (below it the tail is taken as empty).
STUDENT_TAIL_FLOOR = -100.0


class VocabMismatchError(ValueError):
    """Teacher and student do not share a vocabulary: their token ids mean different things."""


def check_vocab(teacher_vocab_size: int, teacher_tokenizer_hash: str, student_vocab_size: int,
                student_tokenizer_hash: str) -> None:
    problems = []
    if teacher_vocab_size != student_vocab_size:
        problems.append(f"vocab size: teacher {teacher_vocab_size}, student {student_vocab_size}")
    if teacher_tokenizer_hash and not same_digest(teacher_tokenizer_hash, student_tokenizer_hash):
        problems.append(f"tokenizer hash: teacher {teacher_tokenizer_hash}, student {student_tokenizer_hash}")
    if problems:
        raise VocabMismatchError(
            "teacher and student tokenizers differ (" + "; ".join(problems) + "); top-k token ids of this "
            "teacher would be read as other tokens by this student. Use a student built on the teacher's "
            "tokenizer (cross-tokenizer distillation is not supported yet)."
        )


def _with_tail(logprobs: torch.Tensor) -> torch.Tensor:
    """[..., k] log-probabilities -> [..., k+1] with the log of the remaining mass appended."""
    mass = logprobs.exp().sum(-1, keepdim=True).clamp(max=1.0)
    # A top-k holding all the mass (or float16 rounding past 1) leaves a tail of e^-30, not -inf.
    tail = torch.log1p(-mass).clamp(min=-30.0)
    return torch.cat([logprobs, tail], dim=-1)


def teacher_distribution(topk_logprobs: torch.Tensor, capture_temperature: float | torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """Teacher log-probabilities on k ids + tail at the training temperature.

    `capture_temperature` is a float, or a tensor broadcast from the left over `topk_logprobs`'
    leading dims (e.g. [N] per position for [N, k] log-probs, [B] per row for [B, L, k]).
    """
    with_tail = _with_tail(topk_logprobs.float())
    if not torch.is_tensor(capture_temperature):
        if capture_temperature <= 0:
            raise ValueError(f"capture_temperature must be > 0, got {capture_temperature}")
        if abs(capture_temperature - temperature) < 1e-6:
            return with_tail
        return torch.log_softmax(with_tail * (capture_temperature / temperature), dim=-1)
    scale = capture_temperature.to(device=with_tail.device, dtype=with_tail.dtype)
    if bool((scale <= 0).any()):
        raise ValueError("capture_temperature must be > 0 on every row")
    scale = (scale / temperature).reshape(scale.shape + (1,) * (with_tail.dim() - scale.dim()))
    return torch.log_softmax(with_tail * scale, dim=-1)


def student_distribution(student_logits: torch.Tensor, topk_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Student log-probabilities on the teacher's k ids + tail, at `temperature`.

    The tail is exact: a log-sum-exp over the logits outside the k ids. Those ids are filled with
    the dtype's most negative finite value (not -inf), so the gradient stays finite even when the
    k ids cover the whole vocabulary.
    """
    logprobs = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    ids = topk_ids.long()
    outside = logprobs.scatter(-1, ids, torch.finfo(logprobs.dtype).min)
    # Floored like the teacher's tail, so an empty tail costs nothing instead of overflowing.
    tail = torch.logsumexp(outside, -1, keepdim=True).clamp(min=STUDENT_TAIL_FLOOR)
    return torch.cat([torch.gather(logprobs, -1, ids), tail], dim=-1)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def forward_kl(t_log: torch.Tensor, s_log: torch.Tensor) -> torch.Tensor:
    return _kl(t_log, s_log)


def reverse_kl(t_log: torch.Tensor, s_log: torch.Tensor) -> torch.Tensor:
    return _kl(s_log, t_log)


def generalized_jsd(t_log: torch.Tensor, s_log: torch.Tensor, beta: float) -> torch.Tensor:
    """beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1 - beta) q; 0 <= JSD <= log 2."""
    if beta <= 0:
        return reverse_kl(t_log, s_log) * 0.0
    if beta >= 1:
        return forward_kl(t_log, s_log) * 0.0
    m_log = torch.logsumexp(torch.stack([t_log + torch.log(torch.tensor(beta)),
                                         s_log + torch.log(torch.tensor(1 - beta))]), dim=0)
    return beta * _kl(t_log, m_log) + (1 - beta) * _kl(s_log, m_log)


@dataclass(frozen=True)
class LossWeights:
    forward_kl: float = 1.0
    reverse_kl: float = 0.0
    jsd: float = 0.0
    ce: float = 0.5


class DistillationLoss:
    def __init__(self, weights: LossWeights = LossWeights(), temperature: float = 1.0, jsd_beta: float = 0.5):
        self.weights, self.temperature, self.jsd_beta = weights, temperature, jsd_beta

    def __call__(self, student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 labels: torch.Tensor, mask: torch.Tensor,
                 capture_temperature: float | torch.Tensor = 1.0) -> dict[str, torch.Tensor]:
        """student_logits [N, V], topk_ids/topk_logprobs [N, k], labels [N], mask [N] (1 = a
        completion position), capture_temperature a float or [N] per position. Returns the total
        ("loss") and every part (means over masked positions; KL and JSD parts already x T^2)."""
        mask = mask.float()
        n = mask.sum().clamp(min=1.0)
        T = self.temperature
        t_log = teacher_distribution(topk_logprobs.float(), capture_temperature, T)
        s_log = student_distribution(student_logits, topk_ids, T)
        parts = {
            "forward_kl": (forward_kl(t_log, s_log) * mask).sum() / n * T * T,
            "reverse_kl": (reverse_kl(t_log, s_log) * mask).sum() / n * T * T,
            "jsd": (generalized_jsd(t_log, s_log, self.jsd_beta) * mask).sum() / n * T * T,
            "ce": (F.cross_entropy(student_logits.float(), labels.clamp(min=0), reduction="none") * mask).sum() / n,
        }
        w = self.weights
        parts["loss"] = (w.forward_kl * parts["forward_kl"] + w.reverse_kl * parts["reverse_kl"]
                         + w.jsd * parts["jsd"] + w.ce * parts["ce"])
        return parts
