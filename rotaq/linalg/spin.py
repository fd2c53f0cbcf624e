"""Learned residual rotations (SpinQuant style): Cayley SGD on the orthogonal group under the
weight/activation quantizers.

A pre-norm stream rotated by an orthogonal ``R`` (``x -> x R``) leaves the float network
unchanged (:mod:`rotaq.passes.folds`), but not its quantized version: every reader linear
computes ``Q_a(x R) Q_w(W R)^T`` (:func:`reader`, with ``x R`` the rotated stream) and every writer
``Q_a(x) Q_w(R^T W)^T`` (:func:`writer`). ``Q_w``, ``Q_a``: the round-to-nearest quantizers of
:mod:`rotaq.linalg.flatquant` with straight-through gradients. Three objectives: the peak-to-RMS
proxy :func:`outlier_objective` (no quantizer in the loss; see its doc for why), and two through
the quantizers:

- end to end (SpinQuant's): the quantized network's next-token cross-entropy on calibration
  text, through a differentiable forward of the graph (:mod:`rotaq.rewriter.torch_exec`) whose
  linears are :func:`reader` / :func:`writer` (built by the ``spin`` pass);
- layer-wise (:func:`layer_objective`): per linear, with ``X`` its captured inputs,

      reader j of a group:  e_j(R) = ||Q_a(X R) Q_w(W_j R)^T - X W_j^T||_F^2 / ||X W_j^T||_F^2
      writer:               e(R)   = ||Q_a(X) Q_w(R^T W)^T - X W^T R||_F^2 / ||X W^T||_F^2

  (the writer's error measured in the rotated stream, the same norm: ``R`` is orthogonal),
  averaged; needs only captured inputs and weights.

Cayley SGD (Li, Fuxin, Todorovic 2020; SpinQuant): with the Euclidean gradient ``G``, the skew
matrix ``A = G R^T - R G^T`` gives the Riemannian descent direction ``-A R``, and

    R <- (I + a/2 A)^{-1} (I - a/2 A) R

stays exactly orthogonal (the Cayley transform of a skew matrix is orthogonal). The step ``a``
is ``lr`` (cosine-decayed) with momentum on ``A``, capped so that a step rotates by at most
``max_angle`` (``a ||A||_F <= max_angle``). With full-batch data a step that raises the loss is
undone (rate halved), so the result is never worse than the start (the random Hadamard) on the
calibration data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from rotaq.linalg.flatquant import fake_quant_tokens, fake_quant_weight


@dataclass
class Quantizers:
    """The weight / activation quantizers the loss simulates (0 bits: not quantized)."""

    w_bits: int = 4
    w_group: int = 128
    w_symmetric: bool = False
    a_bits: int = 4
    a_clip: float = 0.9

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant_weight(w, self.w_bits, self.w_group, self.w_symmetric) \
            if self.w_bits else w

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant_tokens(x, self.a_bits, self.a_clip) if self.a_bits else x


@dataclass
class Block:
    """One block's linears on the stream: reader groups ``(X [T, d], [W_j [m_j, d]])`` (one
    group per norm output) and writers ``(X [T, n], W [d, n])``."""

    readers: list[tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=list)
    writers: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


class _Terms:
    """A block's loss terms as float32 tensors, with the R-independent parts precomputed."""

    def __init__(self, block: Block, q: Quantizers):
        t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)
        self.readers = []
        for x, ws in block.readers:
            xt = t(x)
            wts = [t(w) for w in ws]
            refs = [xt @ w.T for w in wts]
            self.readers.append((xt, wts, refs, [float((r * r).sum()) or 1.0 for r in refs]))
        self.writers = []
        for x, w in block.writers:
            xt, wt = t(x), t(w)
            ref = xt @ wt.T
            self.writers.append((q.tokens(xt).detach(), wt, ref, float((ref * ref).sum()) or 1.0))
        self.count = sum(len(r[1]) for r in self.readers) + len(self.writers)

    def loss(self, r: torch.Tensor, q: Quantizers) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32)
        for xt, wts, refs, norms in self.readers:
            xq = q.tokens(xt @ r)
            for w, ref, nrm in zip(wts, refs, norms):
                err = xq @ q.weight(w @ r).T - ref
                total = total + (err * err).sum() / nrm
        for xq, w, ref, nrm in self.writers:
            err = xq @ q.weight(r.T @ w).T - ref @ r
            total = total + (err * err).sum() / nrm
        return total


def random_start(d: int, seed: int) -> np.ndarray:
    """``rotate``'s residual rotation for ``seed`` (the random Hadamard), as a dense matrix."""
    from rotaq.linalg.hadamard import random_rotation

    return random_rotation(d, seed).matrix()


def cayley_step(r: np.ndarray, a: np.ndarray, alpha: float) -> np.ndarray:
    """``(I + alpha/2 A)^{-1} (I - alpha/2 A) R`` for a skew ``A`` (float64; orthogonal)."""
    eye = np.eye(len(r))
    return np.linalg.solve(eye + 0.5 * alpha * a, (eye - 0.5 * alpha * a) @ r)


def nearest_orthogonal(r: np.ndarray) -> np.ndarray:
    """The orthogonal matrix closest to ``r`` (polar factor), removing rounding drift."""
    u, _, vt = np.linalg.svd(r)
    return u @ vt


@dataclass
class SpinResult:
    rotation: np.ndarray  # float64, orthogonal
    loss_init: float
    loss_final: float
    steps: int
    history: list[float]


Objective = Callable[[torch.Tensor, int], float]
"""``fn(R, step)``: the loss at ``R`` (a float32 leaf tensor) on the data of ``step``, its
gradient accumulated in ``R.grad``."""


def layer_objective(blocks: list[Block], quantizers: Quantizers) -> Objective:
    """``L(R)`` of the module doc: the mean relative output error of every linear."""
    terms = [_Terms(b, quantizers) for b in blocks]
    count = sum(t.count for t in terms) or 1

    def fn(rt: torch.Tensor, step: int = 0) -> float:
        total = 0.0
        for t in terms:  # one block's graph at a time: backward frees it before the next
            part = t.loss(rt, quantizers) / count
            part.backward()
            total += float(part.detach())
        return total

    return fn


def outlier_objective(xs: list[np.ndarray], p: float = 8.0, tokens: int = 32768,
                      seed: int = 0) -> Objective:
    """A smooth proxy of the per-token activation quantization error of the stream readers.

    A token ``y = x R`` quantized symmetrically per token with ``b`` bits and clip ``c`` has the
    step ``c max_j |y_j| / q`` (``q = 2^(b-1) - 1``), so its rounding error is about
    ``d (c max_j |y_j| / q)^2 / 12`` against the signal ``||y||^2 = ||x||^2`` (``R`` is
    orthogonal). Only the peak-to-RMS ratio ``max_j y_j^2 / mean_j y_j^2`` depends on ``R``;
    the max is replaced by the power mean ``(mean_j |y_j|^p)^(1/p)`` (at most the max, equal to
    it as ``p -> inf``) so that the loss is differentiable everywhere:

        L(R) = mean_t (mean_j |(x_t R)_j|^p)^(2/p) / mean_j x_tj^2

    over ``tokens`` rows drawn (with ``seed``) from the readers' captured inputs ``xs``. Unlike
    the straight-through gradient of the rounding error (noise: any finite step redraws the
    rounding), this gradient moves ``R`` towards flatter tokens, which is all a rotation can do
    for per-token quantization. Weights are not in the loss (GPTQ follows)."""
    rows = np.concatenate([np.asarray(x, np.float32).reshape(-1, x.shape[-1]) for x in xs])
    rng = np.random.default_rng(seed)
    if len(rows) > tokens:
        rows = rows[np.sort(rng.choice(len(rows), tokens, replace=False))]
    data = _unit_rms(rows)

    def fn(rt: torch.Tensor, step: int = 0) -> float:
        loss = _peak_ratio(data @ rt, p).mean()
        loss.backward()
        return float(loss.detach())

    return fn


def head_outlier_objective(sets: list[tuple[np.ndarray, int]], head_dim: int,
                           p: float = 8.0) -> Objective:
    """:func:`outlier_objective` for a per-head rotation ``R2`` (``[head_dim, head_dim]``) that
    acts on every head of a row, ``(x_1, .., x_k) -> (x_1 R2, .., x_k R2)`` (``rotate_ov``'s
    fold: the values and the o_proj input of one attention).

    ``sets``: ``(rows [T, n], group)`` with ``n`` and ``group`` multiples of ``head_dim``; the
    peak-to-RMS power mean is taken over each ``group`` consecutive channels, the span of the
    quantizer that reads them (the whole row for o_proj's per-token activation, one head for
    the per-token-and-head KV cache, ``w_group`` inputs for a row of W_o, whose columns R2
    rotates too), averaged over the groups of a set, summed over the sets. A ragged last group
    (576 inputs in groups of 128) is a group of its own size. A group's RMS does not depend on
    ``R2`` (it acts within heads), so it is divided out once."""
    data = []
    for rows, group in sets:
        rows = np.asarray(rows, np.float32)
        n = rows.shape[-1]
        full = n - n % group
        chunks = [(rows[:, :full], group), (rows[:, full:], n - full)]
        if any(size % head_dim for _, size in chunks):
            raise ValueError(f"spin: groups of {group} of rows of {n} channels do not fall on "
                             f"heads of {head_dim}")
        parts = [_unit_rms(x.reshape(-1, size)).reshape(-1, size // head_dim, head_dim)
                 for x, size in chunks if size]
        data.append((parts, max(1, sum(len(x) for x in parts))))

    def fn(rt: torch.Tensor, step: int = 0) -> float:
        loss = sum(sum(_peak_ratio((x @ rt).flatten(1), p).sum() for x in parts) / count
                   for parts, count in data)
        loss.backward()
        return float(loss.detach())

    return fn


def _unit_rms(rows: np.ndarray) -> torch.Tensor:
    """The rows divided by their RMS (all-zero rows dropped), float32."""
    rms = np.sqrt((rows.astype(np.float64) ** 2).mean(-1, keepdims=True))
    keep = rms[:, 0] > 0
    return torch.as_tensor((rows[keep] / rms[keep]).astype(np.float32))


def _peak_ratio(y: torch.Tensor, p: float) -> torch.Tensor:
    """Per row, ``(mean_j |y_j|^p)^(2/p)`` (the squared power mean; rows of unit RMS)."""
    return y.abs().pow(p).mean(-1).pow(2.0 / p)


def reader(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, r: torch.Tensor,
           q: Quantizers) -> torch.Tensor:
    """A stream reader of the rotated, quantized model: ``Q_a(x) Q_w(W R)^T + b`` (``x`` is
    already the rotated stream's normalized value)."""
    y = q.tokens(x) @ q.weight(w @ r).T
    return y if b is None else y + b


def writer(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, r: torch.Tensor,
           q: Quantizers) -> torch.Tensor:
    """A stream writer of the rotated, quantized model: ``Q_a(x) Q_w(R^T W)^T + b R``."""
    y = q.tokens(x) @ q.weight(r.T @ w).T
    return y if b is None else y + b @ r


def cayley_minimize(objective: Objective, r0: np.ndarray, *, steps: int = 100,
                    lr: float = 0.05, momentum: float = 0.9, keep_best: bool = True,
                    max_angle: float = 0.5,
                    progress: Callable[[int, float], None] | None = None) -> SpinResult:
    """Minimize ``objective`` over orthogonal ``R`` by Cayley SGD from ``r0`` (module doc): the
    skew direction ``V <- momentum V + A`` and the step ``R <- cayley(a V) R`` with
    ``a = min(lr_t, max_angle / ||V||_F)`` (a cosine-decayed ``lr``; the cap bounds a step's
    rotation angle, as in Li et al.'s Cayley SGD).

    ``keep_best`` (every step sees the same data): a step that raises the loss is undone, the
    momentum reset and the rate halved, so the loss never rises and the best iterate is
    returned. Otherwise (minibatches) the last iterate is returned."""
    r = nearest_orthogonal(np.asarray(r0, np.float64))
    vel = np.zeros_like(r)
    history: list[float] = []
    best = (math.inf, r, None)
    scale = 1.0
    for step in range(max(steps, 0) + 1):
        rt = torch.tensor(r, dtype=torch.float32, requires_grad=True)
        value = objective(rt, step)
        history.append(value)
        if progress is not None:
            progress(step, value)
        grad = None if rt.grad is None else rt.grad.double().numpy()
        if math.isfinite(value) and (value < best[0] or not keep_best):
            best = (value, r, grad)
        elif keep_best:  # undo: back to the best point, gentler
            r, grad = best[1], best[2]
            vel = np.zeros_like(r)
            scale *= 0.5
        if step == steps or grad is None:
            break
        a = grad @ r.T - r @ grad.T
        vel = momentum * vel + a
        size = float(np.linalg.norm(vel))
        if size == 0.0:
            break
        rate = scale * lr * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1)))
        r = cayley_step(r, vel, min(rate, max_angle / size))
    return SpinResult(nearest_orthogonal(best[1]), history[0], best[0], len(history) - 1,
                      history)
