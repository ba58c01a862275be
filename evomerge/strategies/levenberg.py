"""Bit-reproducible least squares for MAP's surrogates: y ~ phi(F @ beta) with a few dozen parameters.

A journal replay must refit every surrogate to the same last bit, in any process: a sigmoid fit from 20 points
can land in another local optimum after a one-ulp difference, and MAP's next asks (and the rest of the run)
follow the fit. BLAS (lstsq, matmul, MINPACK's neighbours in scipy) and numpy's SIMD transcendental loops
(whose last bits depend on the array's alignment) are therefore avoided: every sum is `math.fsum` (exactly
rounded, so independent of order), every product is one IEEE multiplication, the link and its derivative are
`math` functions applied element by element, and the normal equations are solved by a Cholesky factorization
written out here. Problems are small (p <= ~30 parameters, n <= a few hundred points), so this costs
milliseconds to a few hundred milliseconds per fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Link = tuple[Callable[[float], float], Callable[[float], float]]  # phi, phi'


def _sigmoid(q: float) -> float:
    return 0.5 * (1.0 + math.tanh(0.5 * q))


def _softplus(q: float) -> float:
    return max(q, 0.0) + math.log1p(math.exp(-abs(q)))


LINK_FUNCTIONS: dict[str, Link] = {
    "identity": (lambda q: q, lambda q: 1.0),
    "sigmoid": (_sigmoid, lambda q: _sigmoid(q) * (1.0 - _sigmoid(q))),
    "softplus": (_softplus, _sigmoid),
}


def linear_predictor(feats: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """feats @ beta, each row an exactly rounded sum."""
    return np.array([math.fsum(row * beta) for row in feats])


def apply(fn: Callable[[float], float], q: np.ndarray) -> np.ndarray:
    return np.array([fn(float(v)) for v in q])


def gram(a: np.ndarray) -> np.ndarray:
    """a.T @ a with exactly rounded entries."""
    p = a.shape[1]
    out = np.empty((p, p))
    for i in range(p):
        for j in range(i, p):
            out[i, j] = out[j, i] = math.fsum(a[:, i] * a[:, j])
    return out


def solve_spd(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """x with a @ x = b for a symmetric positive definite a (Cholesky, fixed order); None when a is not."""
    p = len(b)
    low = np.zeros((p, p))
    for i in range(p):
        for j in range(i + 1):
            s = a[i, j] - math.fsum(low[i, :j] * low[j, :j])
            if i == j:
                if not s > 0.0:
                    return None
                low[i, i] = math.sqrt(s)
            else:
                low[i, j] = s / low[j, j]
    z = np.zeros(p)
    for i in range(p):
        z[i] = (b[i] - math.fsum(low[i, :i] * z[:i])) / low[i, i]
    x = np.zeros(p)
    for i in reversed(range(p)):
        x[i] = (z[i] - math.fsum(low[i + 1 :, i] * x[i + 1 :])) / low[i, i]
    return x


def linear_least_squares(feats: np.ndarray, z: np.ndarray, ridge: float = 1e-10) -> np.ndarray:
    """argmin ||feats @ beta - z||^2 by the normal equations, with a relative ridge that keeps them definite."""
    a = gram(feats)
    a[np.diag_indices_from(a)] += ridge * max(1.0, float(np.max(np.abs(np.diag(a)))))
    b = np.array([math.fsum(feats[:, i] * z) for i in range(feats.shape[1])])
    x = solve_spd(a, b)
    if x is None:
        raise ValueError("the features are degenerate: no least-squares solution")
    return x


def sse(feats: np.ndarray, y: np.ndarray, beta: np.ndarray, link: str) -> float:
    r = apply(LINK_FUNCTIONS[link][0], linear_predictor(feats, beta)) - y
    return math.fsum(r * r)


def levenberg_marquardt(
    feats: np.ndarray,
    y: np.ndarray,
    beta0: np.ndarray,
    link: str,
    *,
    max_iter: int = 1000,
    tol: float = 1e-12,
) -> tuple[np.ndarray, float]:
    """Minimize sum (phi(feats @ beta) - y)^2 from beta0 with Marquardt's scaled damping (analytic Jacobian);
    returns (beta, squared error). Stops when a step lowers the error by less than `tol` relative, when the
    damping grows past any useful step, or after `max_iter` steps."""
    phi, dphi = LINK_FUNCTIONS[link]
    beta = np.asarray(beta0, dtype=np.float64).copy()
    q = linear_predictor(feats, beta)
    r = apply(phi, q) - y
    err = math.fsum(r * r)
    lam = 1e-3
    for _ in range(max_iter):
        jac = feats * apply(dphi, q)[:, None]
        a = gram(jac)
        g = np.array([math.fsum(jac[:, i] * r) for i in range(len(beta))])
        scale = np.maximum(np.diag(a), 1e-300)
        while lam < 1e16:
            step = solve_spd(a + np.diag(lam * scale), -g)
            if step is not None:
                trial = beta + step
                q_trial = linear_predictor(feats, trial)
                r_trial = apply(phi, q_trial) - y
                err_trial = math.fsum(r_trial * r_trial)
                if math.isfinite(err_trial) and err_trial < err:
                    break
            lam *= 10.0
        else:
            return beta, err  # no step lowers the error: a minimum (to the precision of the damping)
        done = err - err_trial <= tol * max(err, 1e-300)
        beta, q, r, err = trial, q_trial, r_trial, err_trial
        lam = max(lam / 10.0, 1e-12)
        if done:
            break
    return beta, err
