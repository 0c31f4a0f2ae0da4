"""training/kd.py against closed forms, HF's cross-entropy, gradcheck and extreme logits."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from training.kd import kd_loss, kd_loss_topk, topk_logits

DIVERGENCES = ["forward_kl", "reverse_kl", "jsd", "skew_kl"]
# The cached top-k loss normalises the student over the vocabulary or over the k ids; reverse KL only over the k ids.
TOPK_CASES = [(d, n) for d in DIVERGENCES for n in ("vocab", "topk") if (d, n) != ("reverse_kl", "vocab")]


def _batch(seed: int = 0, dtype: torch.dtype = torch.float32, b: int = 2, t: int = 6, v: int = 7,
           scale: float = 2.0) -> tuple[Tensor, Tensor, Tensor]:
    """Random student/teacher logits and labels with some masked positions (not the first label, which is unused)."""
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(b, t, v, generator=g)).to(dtype)
    teacher = (scale * torch.randn(b, t, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 2] = labels[1, -2] = -100
    return student, teacher, labels


def _np_divergence(p: np.ndarray, q: np.ndarray, divergence: str, beta: float) -> float:
    """Reference from probabilities (the code under test works in log space)."""
    def kl(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sum(a * np.log(a / b)))
    if divergence == "forward_kl":
        return kl(p, q)
    if divergence == "reverse_kl":
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m) if divergence == "jsd" else kl(p, m)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize(("divergence", "beta", "expected"), [
    ("forward_kl", 0.5, math.log(3) - 1.5 * math.log(2)),
    ("reverse_kl", 0.5, 5 / 3 * math.log(2) - math.log(3)),
    # m = (5/12, 7/24, 7/24)
    ("jsd", 0.5, 0.5 * (0.5 * math.log(0.5 / (5 / 12)) + 0.5 * math.log(0.25 / (7 / 24)))
     + 0.5 * (1 / 3 * math.log((1 / 3) / (5 / 12)) + 2 / 3 * math.log((1 / 3) / (7 / 24)))),
    # m = 0.1 p + 0.9 q = (0.35, 0.325, 0.325)
    ("skew_kl", 0.1, 0.5 * math.log(0.5 / 0.35) + 0.5 * math.log(0.25 / 0.325)),
])
def test_hand_computed_values(divergence: str, beta: float, expected: float) -> None:
    # One scored position: teacher p = (1/2, 1/4, 1/4), student q uniform; the last position is dropped by the shift.
    teacher = torch.tensor([[[math.log(0.5), math.log(0.25), math.log(0.25)], [9.0, -3.0, 1.0]]], dtype=torch.float64)
    student = torch.tensor([[[0.3, 0.3, 0.3], [-5.0, 2.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 1]])
    loss, parts = kd_loss(student, teacher, labels, alpha=0.0, temperature=1.0, divergence=divergence, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert parts["kd"].item() == pytest.approx(expected, rel=1e-12)
    assert parts["ce"].item() == pytest.approx(math.log(3), rel=1e-12)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.5])
def test_matches_numpy_reference_with_temperature_and_mask(divergence: str, temperature: float) -> None:
    student, teacher, labels = _batch(1, torch.float64)
    alpha, beta = 0.3, 0.3
    loss, parts = kd_loss(student, teacher, labels, alpha=alpha, temperature=temperature, divergence=divergence,
                          beta=beta)
    ces, ds = [], []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            s, te = student[b, t].numpy(), teacher[b, t].numpy()
            ces.append(-math.log(_np_softmax(s)[y]))
            ds.append(_np_divergence(_np_softmax(te / temperature), _np_softmax(s / temperature), divergence, beta))
    assert len(ds) == 8  # 2 x 5 shifted positions, 2 masked
    assert parts["ce"].item() == pytest.approx(np.mean(ces), rel=1e-10)
    assert parts["kd"].item() == pytest.approx(np.mean(ds), rel=1e-10)
    expected = alpha * np.mean(ces) + (1 - alpha) * temperature**2 * np.mean(ds)
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_skew_kl_with_beta_zero_is_forward_kl() -> None:
    student, teacher, labels = _batch(2)
    skew, _ = kd_loss(student, teacher, labels, alpha=0.0, temperature=2.0, divergence="skew_kl", beta=0.0)
    fwd, _ = kd_loss(student, teacher, labels, alpha=0.0, temperature=2.0, divergence="forward_kl")
    torch.testing.assert_close(skew, fwd)


@pytest.mark.parametrize(("divergence", "norm"), [(d, None) for d in DIVERGENCES] + TOPK_CASES)
def test_masked_positions_contribute_nothing(divergence: str, norm: str | None) -> None:
    student, teacher, labels = _batch(3)

    def run(s: Tensor, te: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        s = s.clone().requires_grad_(True)
        kw: dict[str, Any] = {"alpha": 0.4, "temperature": 2.0, "divergence": divergence}
        if norm:
            values, indices = torch.topk(te, 4, dim=-1)
            loss, _ = kd_loss_topk(s, values, indices, y, student_norm=norm, **kw)
        else:
            loss, _ = kd_loss(s, te, y, **kw)
        loss.backward()
        assert s.grad is not None
        return loss.detach(), s.grad

    loss, grad = run(student, teacher, labels)
    # Positions (0, 1) and (1, 3) predict masked labels; position -1 predicts nothing; label 0 is never a target.
    s2, t2, y2 = student.clone(), teacher.clone(), labels.clone()
    for b, t in [(0, 1), (1, 3), (0, -1), (1, -1)]:
        s2[b, t], t2[b, t] = float("nan"), 1e30
    y2[:, 0] = 5
    loss2, grad2 = run(s2, t2, y2)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    assert not grad[0, 1].any() and not grad[1, 3].any() and not grad[:, -1].any() and grad[0, 0].any()


def test_alpha_one_is_hf_cross_entropy() -> None:
    student, teacher, labels = _batch(4)
    loss, parts = kd_loss(student, teacher, labels, alpha=1.0, temperature=3.0, divergence="jsd")
    v = student.shape[-1]
    hf = F.cross_entropy(student[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, hf)
    torch.testing.assert_close(parts["ce"], hf)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_identical_distributions_give_zero(divergence: str, temperature: float) -> None:
    student, _, labels = _batch(5)
    loss, parts = kd_loss(student, student.clone(), labels, alpha=0.0, temperature=temperature,
                          divergence=divergence, beta=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(parts["kd"], torch.tensor(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergences_are_positive_on_random_inputs(divergence: str) -> None:
    for seed in range(10):
        student, teacher, labels = _batch(seed, scale=0.5 + seed)
        _, parts = kd_loss(student, teacher, labels, alpha=0.5, temperature=1.0 + seed / 5, divergence=divergence,
                           beta=0.05 + seed / 11)
        assert parts["kd"].item() > 0.0


@pytest.mark.parametrize(("divergence", "norm"), [(d, None) for d in DIVERGENCES] + TOPK_CASES)
def test_gradcheck(divergence: str, norm: str | None) -> None:
    student, teacher, labels = _batch(6, torch.float64, b=2, t=4, v=5)
    student.requires_grad_(True)
    values, indices = torch.topk(teacher, 3, dim=-1)

    def f(s: Tensor) -> Tensor:
        kw: dict[str, Any] = {"alpha": 0.3, "temperature": 1.7, "divergence": divergence, "beta": 0.3}
        out = (kd_loss_topk(s, values, indices, labels, student_norm=norm, **kw) if norm
               else kd_loss(s, teacher, labels, **kw))
        return out[0]

    assert torch.autograd.gradcheck(f, (student,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_huge_logits_stay_finite(divergence: str, dtype: torch.dtype) -> None:
    student, teacher, labels = _batch(7, dtype, scale=1e4)
    student.requires_grad_(True)
    values, indices = torch.topk(teacher, 3, dim=-1)
    for temperature in (1.0, 2.0):
        kw: dict[str, Any] = {"alpha": 0.5, "temperature": temperature, "divergence": divergence, "beta": 0.1}
        norms = [n for d, n in TOPK_CASES if d == divergence]
        losses = [kd_loss(student, teacher, labels, **kw)] + [
            kd_loss_topk(student, values, indices, labels, student_norm=n, **kw) for n in norms]
        for loss, _ in losses:
            (grad,) = torch.autograd.grad(loss, student)
            assert torch.isfinite(loss) and loss > 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize(("divergence", "norm"), TOPK_CASES)
def test_topk_with_all_indices_in_any_order_is_the_full_loss(divergence: str, norm: str) -> None:
    student, teacher, labels = _batch(8)
    v = student.shape[-1]
    g = torch.Generator().manual_seed(0)
    indices = torch.stack([torch.randperm(v, generator=g) for _ in range(labels.numel())]).view(*labels.shape, v)
    kw: dict[str, Any] = {"alpha": 0.4, "temperature": 2.0, "divergence": divergence, "beta": 0.3}
    s1, s2 = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    full, full_parts = kd_loss(s1, teacher, labels, **kw)
    top, top_parts = kd_loss_topk(s2, teacher.gather(-1, indices), indices, labels, student_norm=norm, **kw)
    torch.testing.assert_close(top, full)
    torch.testing.assert_close(top_parts, full_parts)
    full.backward()
    top.backward()
    torch.testing.assert_close(s2.grad, s1.grad)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_norm_below_vocab_only_moves_the_top_k_student_logits(divergence: str) -> None:
    student, teacher, labels = _batch(9, v=11)
    student.requires_grad_(True)
    values, indices = topk_logits(teacher, 4)
    loss, parts = kd_loss_topk(student, values, indices, labels, alpha=0.0, temperature=2.0, divergence=divergence,
                               student_norm="topk")
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and parts["kd"] > 0
    in_topk = torch.zeros_like(grad, dtype=torch.bool).scatter_(-1, indices.long(), True)
    scored = torch.zeros_like(in_topk)
    scored[:, :-1] = (labels[:, 1:] != -100).unsqueeze(-1)
    assert not grad[~(in_topk & scored)].any()
    assert (grad[in_topk & scored] != 0).float().mean() > 0.9  # zero only by coincidence


def test_topk_logits_cache_format() -> None:
    _, teacher, labels = _batch(10)
    values, indices = topk_logits(teacher, 3)
    assert values.dtype == torch.float16 and indices.dtype == torch.int32 and values.shape == (2, 6, 3)
    ref = torch.topk(teacher, 3, dim=-1)
    torch.testing.assert_close(values, ref.values.half())
    assert torch.equal(indices.long(), ref.indices)
    # The float16 cache of all V logits reproduces the full loss up to float16 rounding.
    full_values, full_indices = topk_logits(teacher, teacher.shape[-1])
    student = torch.randn_like(teacher)
    kw: dict[str, Any] = {"alpha": 0.5, "temperature": 2.0, "divergence": "forward_kl"}
    torch.testing.assert_close(kd_loss_topk(student, full_values, full_indices, labels, **kw)[0],
                               kd_loss(student, teacher, labels, **kw)[0], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="float16"):
        topk_logits(teacher * 1e5, 3)


def test_all_positions_masked_gives_zero_not_nan() -> None:
    student, teacher, _ = _batch(11)
    labels = torch.full(student.shape[:2], -100)
    loss, parts = kd_loss(student.requires_grad_(True), teacher, labels, alpha=0.5, temperature=2.0,
                          divergence="jsd")
    assert loss.item() == 0.0 and parts["ce"].item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize(("divergence", "beta", "alpha", "temperature"), [
    ("kl", 0.5, 0.5, 1.0), ("jsd", 0.0, 0.5, 1.0), ("jsd", 1.0, 0.5, 1.0), ("skew_kl", 1.0, 0.5, 1.0),
    ("forward_kl", 0.5, 1.5, 1.0), ("forward_kl", 0.5, 0.5, 0.0),
])
def test_rejects_bad_arguments(divergence: str, beta: float, alpha: float, temperature: float) -> None:
    student, teacher, labels = _batch(12)
    with pytest.raises(ValueError):
        kd_loss(student, teacher, labels, alpha=alpha, temperature=temperature, divergence=divergence, beta=beta)


@pytest.mark.parametrize(("divergence", "beta"), [("forward_kl", 0.5), ("skew_kl", 0.1), ("jsd", 0.3)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_vocab_norm_matches_reference_with_a_rest_outcome(divergence: str, beta: float, temperature: float) -> None:
    # The teacher on its top 3 of 7, renormalised there and 0 on a 4th outcome "rest"; the student's softmax
    # over all 7 at the top 3 ids, its remaining mass as "rest". The reference is the ordinary divergence
    # between these two 4-way distributions (0 * log 0 = 0).
    student, teacher, labels = _batch(13, torch.float64)
    values, indices = torch.topk(teacher, 3, dim=-1)
    loss, parts = kd_loss_topk(student, values, indices, labels, alpha=0.0, temperature=temperature,
                               divergence=divergence, beta=beta, student_norm="vocab")

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        return float(sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0))

    ds = []
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if int(labels[b, t + 1]) == -100:
                continue
            q_all = _np_softmax(student[b, t].numpy() / temperature)
            q = q_all[indices[b, t].numpy()]
            q = np.append(q, 1.0 - q.sum())
            p = np.append(_np_softmax(values[b, t].numpy() / temperature), 0.0)
            m = beta * p + (1 - beta) * q
            ds.append(kl(p, q) if divergence == "forward_kl" else
                      kl(p, m) if divergence == "skew_kl" else beta * kl(p, m) + (1 - beta) * kl(q, m))
    assert len(ds) == 8
    assert parts["kd"].item() == pytest.approx(np.mean(ds), rel=1e-10)
    assert loss.item() == pytest.approx(temperature**2 * np.mean(ds), rel=1e-10)


def test_vocab_norm_pushes_the_student_mass_onto_the_teacher_top_k() -> None:
    # Forward KL with the student normalised over the vocabulary: d/ds_j = T * q_T(j) > 0 for every id j
    # outside the teacher's top k, so gradient descent takes mass from them; the k-way normalisation
    # leaves them untouched (test above), blind to mass the student puts outside the top k.
    student, teacher, labels = _batch(14, v=11)
    student.requires_grad_(True)
    values, indices = topk_logits(teacher, 4)
    loss, _ = kd_loss_topk(student, values, indices, labels, alpha=0.0, temperature=2.0, divergence="forward_kl",
                           student_norm="vocab")
    (grad,) = torch.autograd.grad(loss, student)
    outside = torch.ones_like(grad, dtype=torch.bool).scatter_(-1, indices.long(), False)
    scored = torch.zeros_like(outside)
    scored[:, :-1] = (labels[:, 1:] != -100).unsqueeze(-1)
    assert (grad[outside & scored] > 0).all() and not grad[~scored].any()


def test_reverse_kl_with_vocab_norm_is_refused() -> None:
    student, teacher, labels = _batch(15)
    values, indices = torch.topk(teacher, 3, dim=-1)
    with pytest.raises(ValueError, match="student_norm='topk'"):
        kd_loss_topk(student, values, indices, labels, alpha=0.5, temperature=1.0, divergence="reverse_kl",
                     student_norm="vocab")
    with pytest.raises(ValueError, match="unknown student_norm"):
        kd_loss_topk(student, values, indices, labels, alpha=0.5, temperature=1.0, divergence="forward_kl",
                     student_norm="k")  # type: ignore[arg-type]


@pytest.mark.parametrize(("divergence", "norm"), [(d, None) for d in DIVERGENCES] + TOPK_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_loss_equals_all_positions_at_once(divergence: str, norm: str | None, dtype: torch.dtype) -> None:
    """Chunks of 1, 3 and 4 positions (boundaries inside rows and across the batch, masked positions skipped) give
    the loss, its parts and the student's gradient of chunk = 0 (all positions at once, plain autograd)."""
    student, teacher, labels = _batch(9, dtype, b=3, t=7, v=11)
    labels[2, 1:5] = -100
    values, indices = torch.topk(teacher, 4, dim=-1)
    kw: dict[str, Any] = {"alpha": 0.3, "temperature": 2.5, "divergence": divergence, "beta": 0.2}

    def run(chunk: int) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        s = student.clone().requires_grad_(True)
        loss, parts = (kd_loss_topk(s, values, indices.int(), labels, student_norm=norm, chunk=chunk, **kw) if norm
                       else kd_loss(s, teacher, labels, chunk=chunk, **kw))
        (loss * 3.0).backward()  # a scaled upstream gradient, as DeepSpeed's loss scaling gives
        assert s.grad is not None and s.grad.dtype == dtype
        return loss.detach(), parts, s.grad

    loss, parts, grad = run(0)
    for chunk in (1, 3, 4, 10_000):
        c_loss, c_parts, c_grad = run(chunk)
        torch.testing.assert_close(c_loss, loss, rtol=1e-6, atol=1e-7)
        for key in ("ce", "kd"):
            torch.testing.assert_close(c_parts[key], parts[key], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(c_grad, grad, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)
    assert not grad[:, -1].any() and not grad[2, :4].any()  # positions predicting nothing get no gradient


def test_the_chunked_loss_passes_gradcheck_and_needs_no_grad_for_a_value() -> None:
    student, teacher, labels = _batch(10, torch.float64, b=2, t=5, v=4)
    kw: dict[str, Any] = {"alpha": 0.6, "temperature": 1.5, "divergence": "jsd", "beta": 0.4, "chunk": 3}
    assert torch.autograd.gradcheck(lambda s: kd_loss(s, teacher, labels, **kw)[0],
                                    (student.clone().requires_grad_(True),))
    value, _ = kd_loss(student, teacher, labels, **kw)  # no input needs a gradient: nothing is stored
    assert not value.requires_grad
    torch.testing.assert_close(value, kd_loss(student, teacher, labels, **{**kw, "chunk": 0})[0])
    with pytest.raises(ValueError, match="chunk must be >= 0"):
        kd_loss(student, teacher, labels, **{**kw, "chunk": -1})
