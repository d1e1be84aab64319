"""The scale searches behind llama.cpp's K-quants, vectorized across blocks with NumPy.

llama.cpp (ggml-quants.c) picks each block's scale (and min) by trying a ladder of candidate
scales and keeping the one with the least weighted squared error, instead of plain min/max
rounding; that search is what makes its Q4_K better than Q4_0 at the same size. The `gguf`
package has no such encoder (it dequantizes K-quants only), hence this module.

Layout: every function takes blocks as the COLUMNS of a 2-D float32 array, shape (n, B): row i
holds element i of all B blocks. A sum over a block is then a sum of n contiguous vectors, and a
per-block value broadcasts along rows, which keeps every step a long SIMD loop in NumPy.

Each search is the algorithm of the llama.cpp function named in its docstring, written anew:
candidates are evaluated for all blocks at once and only the winning candidate's index is kept,
so the levels are recomputed once at the end instead of being copied per candidate. Errors are
computed from running sums (sum w*l, w*l^2, w*x*l) rather than a second pass over the block.
Rounding is round-half-to-even like llama.cpp's nearest_int; results can differ from llama.cpp's
in the last bit of a product, which flips an occasional level at an exact tie and nothing else.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
EPS = F32(1e-15)  # llama.cpp's GROUP_MAX_EPS: below it a block is all zeros


def _dot(a, b):
    return np.einsum("ij,ij->j", a, b)


def _dot3(a, b, c):
    return np.einsum("ij,ij,ij->j", a, b, c)


def signed_absmax(x):
    """The element of largest magnitude in each block, with its sign (first one on ties)."""
    idx = np.abs(x).argmax(axis=0)
    return x[idx, np.arange(x.shape[1])]


def symmetric_search(x, w, nmax: int, steps=range(-9, 10)):
    """make_qx_quants(rmse_type=1): signed levels -nmax..nmax-1, scale d with x ~ d*l.

    Tries iscale = -(nmax + 0.1*s)/max for each step s (s=0 first) and keeps the first scale
    that maximizes (sum w*x*l)^2 / sum w*l^2, i.e. minimizes the weighted error after refitting
    d. `w` None means llama.cpp's default weights x^2. Returns (d, levels offset by nmax, so
    0..2*nmax-1); both are recomputed once from the winning step, not tracked per step.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        top = signed_absmax(x)
        zero = np.abs(top) < EPS
        v = x / np.where(zero, F32(1), top)
        w = x * x if w is None else w
        wx = w * x
        lv = np.empty_like(x)
        best, best_k = None, None
        for s in [0] + [s for s in steps if s != 0]:
            k = F32(nmax) + F32(0.1) * F32(s)
            _signed_levels(v, -k, nmax, lv)
            sumlx = _dot(wx, lv)
            gain = sumlx * sumlx / _dot3(w, lv, lv)  # NaN where sum w*l^2 is 0: never better
            if best is None:
                best, best_k = np.nan_to_num(gain, nan=0.0, posinf=0.0), np.full_like(gain, k)
                continue
            better = gain > best
            best = np.where(better, gain, best)
            best_k = np.where(better, k, best_k)
        _signed_levels(v, -best_k, nmax, lv)
        suml2 = _dot3(w, lv, lv)
        d = np.where(suml2 > 0, _dot(wx, lv) / suml2, F32(0))
    lv += nmax
    lv[:, zero] = 0
    return np.where(zero, F32(0), d).astype(F32), lv


def _signed_levels(v, k, nmax: int, out):
    np.multiply(v, k, out=out)
    np.rint(out, out=out)
    return np.clip(out, -nmax, nmax - 1, out=out)


def min_scale_search(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False):
    """make_qkx2_quants / make_qkx3_quants: levels 0..nmax with x ~ d*l - m, m >= 0.

    Starts from the min/max fit, then for iscale = (nmax + rmin + rdelta*s)/(max - min),
    s = 0..nstep, rounds x - min, refits d and min by weighted least squares (min clamped to
    <= 0) and keeps the fit with the least weighted error (absolute error with use_mad, as
    Q2_K does). As in llama.cpp, an accepted fit's min becomes the origin of the later
    candidates: that moving origin is part of why its scales beat a fixed grid (about 1% less
    error on Q4_K), so it is kept here although it makes each step two broadcasts, not one.
    Returns (d, m, levels); the levels are recomputed once from the winning candidate's origin
    and iscale rather than copied at every improvement.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return _min_scale_search(x, w, nmax, rmin, rdelta, nstep, use_mad)


def _min_scale_search(x, w, nmax, rmin, rdelta, nstep, use_mad):
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    flat = hi == lo
    sw = w.sum(axis=0)
    wx = w * x
    sx = wx.sum(axis=0)
    lv = np.empty_like(x)
    iscale = np.where(flat, F32(0), F32(nmax) / (hi - lo))
    d0 = np.where(flat, F32(0), F32(1) / np.where(flat, F32(1), iscale))
    _levels(x, lo, iscale, nmax, lv)
    if use_mad:
        best = _abs_error(x, w, lv, d0, lo)
    else:  # the min/max fit is not a least-squares fit: its error needs every term
        d64, m64 = d0.astype(np.float64), lo.astype(np.float64)
        sl, sl2, sxl = _dot(w, lv), _dot3(w, lv, lv), _dot(wx, lv)
        best = (d64 * (d64 * sl2 - 2 * sxl + 2 * m64 * sl) + m64 * (m64 * sw - 2 * sx)).astype(F32)
    best_d, best_m, won_origin, won_iscale = d0, lo, lo.copy(), iscale
    for s in range(nstep + 1):
        k = F32(rmin) + F32(rdelta) * F32(s) + F32(nmax)
        span = hi - best_m  # 0 only in degenerate blocks (all x <= 0 refitted to min 0)
        iscale = np.where(span > 0, k / np.where(span > 0, span, F32(1)), F32(0))
        origin = best_m
        _levels(x, origin, iscale, nmax, lv)
        sl, sl2, sxl = _dot(w, lv), _dot3(w, lv, lv), _dot(wx, lv)
        det = sw * sl2 - sl * sl
        d = (sw * sxl - sx * sl) / det
        mn = (sl2 * sx - sl * sxl) / det
        clamp = mn > 0
        np.copyto(d, sxl / sl2, where=clamp)
        mn[clamp] = 0
        # a least-squares fit satisfies its normal equations, so its error is
        # sum w*x^2 - d*sum w*x*l - mn*sum w*x; sum w*x^2 is the same for every candidate
        score = _abs_error(x, w, lv, d, mn) if use_mad else -(d * sxl + mn * sx)
        better = (det > 0) & (score < best)
        if better.any():
            best = np.where(better, score, best)
            best_d = np.where(better, d, best_d)
            best_m = np.where(better, mn, best_m)
            np.copyto(won_origin, origin, where=better)
            won_iscale = np.where(better, iscale, won_iscale)
    return best_d.astype(F32), (-best_m).astype(F32), _levels(x, won_origin, won_iscale, nmax, lv)


def _abs_error(x, w, lv, d, mn):
    diff = lv * d - x
    diff += mn
    return _dot(w, np.abs(diff))


def _levels(x, origin, iscale, nmax: int, out):
    np.subtract(x, origin, out=out)
    out *= iscale
    np.rint(out, out=out)
    return np.clip(out, 0, nmax, out=out)


def q3_search(x, nmax: int = 4):
    """make_q3_quants(do_rmse=True): levels -nmax..nmax-1, weights x^2, then up to five passes
    of coordinate descent (each level in turn moved to its best value given the others).

    The passes run element by element but across all blocks at once; a block that stops
    changing stays unchanged, so running every block for the same passes gives llama.cpp's
    per-block early stop. Returns (d, levels offset by nmax).
    """
    top = signed_absmax(x)
    zero = np.abs(top) < EPS
    iscale = F32(-nmax) / np.where(zero, F32(1), top)
    lv = np.clip(np.rint(x * iscale), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _dot(wx, lv)
    suml2 = _dot3(w, lv, lv)
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            wi, wxi, li = w[i], wx[i], lv[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.clip(np.rint(x[i] * sl2 / slx), -nmax, nmax - 1)
            slx_new = slx + wxi * new
            sl2_new = sl2 + wi * new * new
            take = (slx > 0) & (new != li) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            if take.any():
                changed = True
                lv[i] = np.where(take, new, li)
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
        if not changed:
            break
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(suml2 > 0, sumlx / suml2, F32(0))
    lv += nmax
    lv[:, zero] = 0
    return np.where(zero, F32(0), d).astype(F32), lv


def positive_search(x, nmax: int, w):
    """make_qp_quants: quantize non-negative values (the sub-block scales of a super-block) to
    0..nmax with one scale, weighted by w: nine candidate scales, then coordinate descent."""
    n, b = x.shape
    top = x.max(axis=0)
    zero = top < EPS
    safe = np.where(zero, F32(1), top)
    best_mse = np.full(b, np.inf)
    best_is = F32(nmax) / safe
    for s in (0, -4, -3, -2, -1, 1, 2, 3, 4):
        iscale = (F32(0.1) * F32(s) + F32(nmax)) / safe
        lv = np.minimum(np.rint(iscale * x), nmax)
        diff = x - lv / iscale
        mse = _dot3(w, diff, diff).astype(np.float64)
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        best_is = np.where(better, iscale, best_is)
    lv = np.minimum(np.rint(best_is * x), nmax)
    wx = w * x
    sumlx, suml2 = _dot(wx, lv), _dot3(w, lv, lv)
    for _ in range(5):
        changed = False
        for i in range(n):
            slx = sumlx - wx[i] * lv[i]
            sl2 = suml2 - w[i] * lv[i] * lv[i]
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.minimum(np.rint(x[i] * sl2 / slx), nmax)
            slx_new = slx + wx[i] * new
            sl2_new = sl2 + w[i] * new * new
            take = (slx > 0) & (sl2 > 0) & (new != lv[i]) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            if take.any():
                changed = True
                lv[i] = np.where(take, new, lv[i])
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
        if not changed:
            break
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(suml2 > 0, sumlx / suml2, F32(0))
    lv[:, zero] = 0
    return np.where(zero, F32(0), d).astype(F32), lv
