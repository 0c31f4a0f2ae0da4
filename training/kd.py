"""Knowledge-distillation losses for the distill stage: the student learns from labels and from the teacher.

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * D(p_T, q_T)

averaged per token over the positions whose label is not `ignore_index`. Causal-LM convention, as in
Hugging Face: the logits at position t predict labels[t + 1], so the last position and the first label
are dropped here and callers pass unshifted tensors. CE uses temperature 1; D compares the
temperature-softened teacher p_T = softmax(teacher / T) and student q_T = softmax(student / T). The T^2
factor keeps the gradient of D on the scale of CE's when T changes (Hinton et al. 2015).

Divergences (per token, summed over the vocabulary; p is the teacher, q the student):
  forward_kl  KL(p || q): mean-seeking, the classic KD loss.
  reverse_kl  KL(q || p): mode-seeking.
  jsd         generalised Jensen-Shannon of GKD (Agarwal et al. 2024), with m = beta*p + (1-beta)*q:
              beta * KL(p || m) + (1 - beta) * KL(q || m), beta in (0, 1). beta = 0.5 is the usual JSD;
              for small beta it behaves like beta * KL(p || q), near 1 like (1 - beta) * KL(q || p).
              Same convention as TRL's GKDTrainer (its beta weights the teacher).
  skew_kl     skew forward KL of DistiLLM (Ko et al. 2024): KL(p || beta*p + (1-beta)*q), beta in [0, 1);
              beta = 0 is forward_kl, DistiLLM's default is 0.1. Mixing p into the target bounds the
              log-ratio, so a student giving ~0 mass where the teacher has some cannot blow the loss up.

Everything works on log-probabilities from log_softmax (never log(softmax)), so logits of any finite
magnitude give finite losses and gradients.

Memory: the loss is computed `chunk` positions at a time (`_Chunked`), and each chunk's gradient with respect
to the student's logits in the same pass, so the float32 temporaries of log_softmax and the divergence exist for
one chunk only: O(chunk x V) besides the logits and their gradient, instead of ~6 float32 (B, T, V) tensors
(8 GB each at V = 128 k, B = 8, T = 2048). `benchmarks/kd_memory.py` measures both. chunk = 0 computes all
positions at once through plain autograd, the reference the chunked loss is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"]
StudentNorm = Literal["vocab", "topk"]  # where the student is normalised in the cached top-k loss
FP16_MAX = 65504.0  # largest finite float16, the dtype the top-k cache stores logits in
CHUNK = 256  # positions per chunk: ~8 float32 temporaries of CHUNK x V, 1 GB at V = 128 k, 0.4 GB at 49 k
Terms = Callable[[Tensor, slice], tuple[Tensor, Tensor]]  # (student rows, which valid rows) -> (CE sum, D sum)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) per row from log-probabilities, summed over the last dim."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _log_mix(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """log(beta * p + (1 - beta) * q) without leaving log space, for beta in [0, 1)."""
    if beta == 0.0:  # log(0) would put -inf into the logsumexp; the mixture is simply q
        return log_q
    return torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))


def _divergence(log_p: Tensor, log_q: Tensor, divergence: str, beta: float) -> Tensor:
    """Per-row divergence of teacher log-probs `log_p` and student log-probs `log_q`, shape (N,)."""
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl(log_q, log_p)
    if divergence == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    if divergence == "skew_kl":
        return _kl(log_p, _log_mix(log_p, log_q, beta))
    raise AssertionError(divergence)  # _check rejected anything else


def _check(alpha: float, temperature: float, divergence: str, beta: float) -> None:
    if divergence not in get_args(Divergence):
        raise ValueError(f"unknown divergence {divergence!r}: expected one of {get_args(Divergence)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs beta in (0, 1), got {beta}")  # 0 or 1 makes the JSD identically 0
    if divergence == "skew_kl" and not 0.0 <= beta < 1.0:
        raise ValueError(f"skew_kl needs beta in [0, 1), got {beta}")  # beta = 1 compares p with itself


def _float(x: Tensor) -> Tensor:
    # bf16/fp16 logits lose too much in log_softmax and in the KL's cancelling terms; float64 stays
    # float64 so that gradcheck sees the exact computation.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _valid_positions(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """(targets, batch index, position index) of the positions whose next label is not ignored, in order."""
    target = labels[:, 1:]
    b, t = (target != ignore_index).nonzero(as_tuple=True)
    return target[b, t], b, t


class _Chunked(torch.autograd.Function):
    """w_ce * CE sum + w_d * D sum over the rows (b, t) of the student's (B, T, V) logits, `chunk` rows at a time.

    The forward pass computes each chunk's terms without a graph; the backward pass recomputes them chunk by
    chunk with autograd on that chunk alone, and writes each chunk's gradient into the one tensor it returns,
    shaped like the logits. So the float32 temporaries never exist for more than one chunk and nothing of the
    logits' size is kept between the passes: the loss costs about the logits' gradient (which any loss needs)
    plus one chunk's temporaries, for one more forward computation of the loss. Recomputing, rather than keeping
    a gradient made in the forward pass, also leaves nothing to scale in place: a graph backpropagated twice
    (gradcheck) gets the same gradient, and no host sync is needed. Also returns the CE and D sums, not
    differentiable.
    """

    @staticmethod
    def forward(ctx: Any, student: Tensor, b: Tensor, t: Tensor, terms: Terms, w_ce: float, w_d: float,
                chunk: int) -> tuple[Tensor, Tensor, Tensor]:
        dtype = torch.promote_types(student.dtype, torch.float32)
        ce_sum = torch.zeros((), dtype=dtype, device=student.device)
        d_sum = torch.zeros((), dtype=dtype, device=student.device)
        for lo in range(0, len(b), chunk):
            rows = slice(lo, lo + chunk)
            ce, d = terms(student[b[rows], t[rows]], rows)
            ce_sum += ce
            d_sum += d
        ctx.save_for_backward(student, b, t)
        ctx.terms, ctx.w_ce, ctx.w_d, ctx.chunk = terms, w_ce, w_d, chunk
        ctx.mark_non_differentiable(ce_sum, d_sum)
        return w_ce * ce_sum + w_d * d_sum, ce_sum, d_sum

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        student, b, t = ctx.saved_tensors
        grad = torch.zeros_like(student)
        for lo in range(0, len(b), ctx.chunk):
            rows = slice(lo, lo + ctx.chunk)
            with torch.enable_grad():
                logits = student[b[rows], t[rows]].detach().requires_grad_(True)
                ce, d = ctx.terms(logits, rows)
                (g,) = torch.autograd.grad(ctx.w_ce * ce + ctx.w_d * d, logits, grad_outputs=grad_loss)
            grad[b[rows], t[rows]] = g
        return grad, None, None, None, None, None, None


def _loss(student_logits: Tensor, target: Tensor, b: Tensor, t: Tensor, terms: Terms, alpha: float,
          temperature: float, chunk: int) -> tuple[Tensor, dict[str, Tensor]]:
    """alpha * CE + (1 - alpha) * T^2 * D per valid position, of `terms` over the rows (b, t): `chunk` rows at a
    time (`_Chunked`), or all at once through plain autograd when chunk is 0.

    Returns the loss and {"ce", "kd"} (detached, per-token means; "kd" is D before the T^2 factor).
    """
    count = max(len(target), 1)  # with no valid position the sums are 0, and so is the loss (not HF's 0/0)
    if chunk == 0:
        ce_sum, d_sum = terms(student_logits[b, t], slice(None))
        loss = alpha * (ce_sum / count) + (1.0 - alpha) * temperature**2 * (d_sum / count)
    else:
        loss, ce_sum, d_sum = _Chunked.apply(student_logits, b, t, terms, alpha / count,
                                             (1.0 - alpha) * temperature**2 / count, chunk)
    return loss, {"ce": ce_sum.detach() / count, "kd": d_sum.detach() / count}


def _check_chunk(chunk: int) -> None:
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0 (0: all positions at once), got {chunk}")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *, alpha: float, temperature: float,
            divergence: str, beta: float = 0.5, ignore_index: int = -100,
            chunk: int = CHUNK) -> tuple[Tensor, dict[str, Tensor]]:
    """Distillation loss against full teacher logits; (B, T, V) logits, (B, T) int64 labels, unshifted.

    Returns the scalar loss and {"ce", "kd"} (detached, per-token means; "kd" is D before the T^2 factor).
    Masked positions take no part at all (their rows are never read): even inf/nan logits there change neither
    the loss nor any gradient.
    """
    _check(alpha, temperature, divergence, beta)
    _check_chunk(chunk)
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:2] != labels.shape:
        raise ValueError(f"shapes differ: student {tuple(student_logits.shape)}, teacher "
                         f"{tuple(teacher_logits.shape)}, labels {tuple(labels.shape)}")
    target, b, t = _valid_positions(labels, ignore_index)

    def terms(student: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        student = _float(student)  # upcast one chunk's rows, never a float32 copy of all logits
        ce_sum = F.cross_entropy(student, target[rows], reduction="sum")
        log_q = F.log_softmax(student / temperature, dim=-1)
        # The teacher is frozen: no graph through it even if the caller forgot torch.no_grad().
        log_p = F.log_softmax(_float(teacher_logits[b[rows], t[rows]].detach()) / temperature, dim=-1)
        return ce_sum, _divergence(log_p, log_q, divergence, beta).sum()

    return _loss(student_logits, target, b, t, terms, alpha, temperature, chunk)


def kd_loss_topk(student_logits: Tensor, teacher_topk_values: Tensor, teacher_topk_indices: Tensor, labels: Tensor,
                 *, alpha: float, temperature: float, divergence: str, beta: float = 0.5,
                 student_norm: StudentNorm = "topk", ignore_index: int = -100,
                 chunk: int = CHUNK) -> tuple[Tensor, dict[str, Tensor]]:
    """Distillation loss against a cached top-k of the teacher's logits, (B, T, k) values and indices.

    The teacher is known only on its top-k support S (per position) and is renormalised there, its mass
    outside S taken as 0:  p_T(i) = exp(v_i / T) / sum_{j in S} exp(v_j / T).  The student q_T depends on
    `student_norm`:
      "vocab"  q_T = softmax(student / T) over the whole vocabulary, read at S. The student's mass
               outside S is one more outcome, "rest", to which the teacher gives 0: forward KL and skew KL
               get no term from it, the JSD gets (1 - beta) * q_rest * -log(1 - beta), and reverse KL
               would be infinite (refused). D therefore also pushes the student's mass onto S: the
               teacher's top k hold nearly all of its probability, and a student that spreads its mass
               elsewhere is penalised, as it is by the live teacher.
      "topk"   q_T renormalised over S too (softmax of the student logits gathered at S): D compares two
               k-way distributions and moves only the student's logits at S, relative to each other, so
               it is blind to how much mass the student puts outside S.
    CE always uses the full student vocabulary at temperature 1. With k = V (indices in any order) both
    are exactly kd_loss. Indices may be int32 or int64.
    """
    _check(alpha, temperature, divergence, beta)
    _check_chunk(chunk)
    if student_norm not in get_args(StudentNorm):
        raise ValueError(f"unknown student_norm {student_norm!r}: expected one of {get_args(StudentNorm)}")
    if student_norm == "vocab" and divergence == "reverse_kl":
        raise ValueError("reverse_kl against a cached top-k is infinite when the student is normalised over the "
                         "vocabulary (the teacher gives 0 to the rest); use student_norm='topk' or another divergence")
    if teacher_topk_values.shape != teacher_topk_indices.shape or (
        teacher_topk_values.shape[:2] != labels.shape or student_logits.shape[:2] != labels.shape
    ):
        raise ValueError(f"shapes differ: student {tuple(student_logits.shape)}, values "
                         f"{tuple(teacher_topk_values.shape)}, indices {tuple(teacher_topk_indices.shape)}, "
                         f"labels {tuple(labels.shape)}")
    target, b, t = _valid_positions(labels, ignore_index)

    def terms(student: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        student = _float(student)
        indices = teacher_topk_indices[b[rows], t[rows]].long()
        ce_sum = F.cross_entropy(student, target[rows], reduction="sum")
        log_p = F.log_softmax(_float(teacher_topk_values[b[rows], t[rows]].detach()) / temperature, dim=-1)
        if student_norm == "topk":
            log_q = F.log_softmax(student.gather(-1, indices) / temperature, dim=-1)
            return ce_sum, _divergence(log_p, log_q, divergence, beta).sum()
        return ce_sum, _divergence_with_rest(log_p, F.log_softmax(student / temperature, dim=-1), indices,
                                             divergence, beta).sum()

    return _loss(student_logits, target, b, t, terms, alpha, temperature, chunk)


def _divergence_with_rest(log_p: Tensor, log_q_vocab: Tensor, indices: Tensor, divergence: str,
                          beta: float) -> Tensor:
    """D between the teacher on its support S (+ "rest" at 0) and the student over S + "rest", per row.

    _kl sums exp(log_a) * (log_a - log_b) over S only, which is right for a sub-normalised student too;
    the rest outcome adds a term only where the student's side of the divergence carries weight.
    """
    log_q = log_q_vocab.gather(-1, indices)
    if divergence == "forward_kl":
        return _kl(log_p, log_q)
    if divergence == "skew_kl":
        return _kl(log_p, _log_mix(log_p, log_q, beta))
    if divergence == "jsd":
        log_m = _log_mix(log_p, log_q, beta)
        # The rest's m is (1 - beta) * q_rest, so KL(q || m) gets q_rest * -log(1 - beta) from it. 1 - sum
        # is off by float rounding only, which this additive term tolerates; a logsumexp over the ids
        # outside S would be exact but its gradient is nan when S is the whole vocabulary.
        q_rest = (1.0 - log_q.exp().sum(-1)).clamp(min=0.0)
        return beta * _kl(log_p, log_m) + (1.0 - beta) * (_kl(log_q, log_m) - q_rest * math.log1p(-beta))
    raise AssertionError(divergence)  # kd_loss_topk refused reverse_kl


def topk_logits(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The teacher's k largest logits per position, for the cache: (values float16, indices int32).

    float16 halves the cache and its rounding (~1e-3 relative) is far below the teacher's own noise;
    int32 indices are enough for any vocabulary below 2^31, else int64. Raises if a logit does not fit
    in float16 rather than cache an inf that would turn the loss into nan.
    """
    vocab = teacher_logits.shape[-1]
    if not 0 < k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}], got {k}")
    values, indices = torch.topk(teacher_logits.detach(), k, dim=-1)
    if bool((values.abs() > FP16_MAX).any()):
        raise ValueError(f"teacher logits exceed the float16 range (|x| > {FP16_MAX}); cannot cache them")
    return values.half(), indices.to(torch.int32 if vocab < 2**31 else torch.int64)
