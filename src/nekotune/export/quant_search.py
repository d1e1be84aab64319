"""The scale searches behind llama.cpp's K-quants, vectorized across blocks with NumPy.

llama.cpp (ggml-quants.c) picks each block's scale (and min) by trying a ladder of candidate
scales and keeping the one with the least weighted squared error, instead of plain min/max
rounding; that search is what makes its Q4_K better than Q4_0 at the same size. The `gguf`
package has no such encoder (it dequantizes K-quants only), hence this module.

Layout: every function takes blocks as the COLUMNS of a 2-D float32 array, shape (n, B): row i
holds element i of all B blocks. A sum over a block is then a sum of n contiguous vectors, and a
per-block value broadcasts along rows, which keeps every step a long SIMD loop in NumPy.

Bit-exact by construction: llama.cpp's quantizers live in libggml-base, built without FMA or
fast-math, so each of its float32 expressions rounds in source order. Here every product is
formed in the same order ((w*l)*x, not w*(l*x)), every error is summed directly rather than from
the normal equations, and every block sum is `a.sum(axis=0)` on the (n, B) layout, which NumPy
accumulates row after row: element 0 first, as llama.cpp's loops do (pairwise summation, NumPy's
default along a contiguous axis, would round differently). A candidate that wins by the last bit
in llama.cpp therefore wins here too: the blocks come out byte for byte the same (the tests check
it against libggml-base), where an algebraically equal but differently rounded search flipped
ties in about 0.5% of Q5_K blocks, enough to move top-1 agreement on the demo model by 1.6 points.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
EPS = F32(1e-15)  # llama.cpp's GROUP_MAX_EPS: below it a block is all zeros


def _sum(a):
    """Each column's sum, element 0 first (see the module docstring); `a` is float32, and so is
    the sum (asking for dtype= explicitly takes a buffered loop four times slower)."""
    return a.sum(axis=0)


def signed_absmax(x):
    """The element of largest magnitude in each block, with its sign (first one on ties)."""
    idx = np.abs(x).argmax(axis=0)
    return x[idx, np.arange(x.shape[1])]


def _signed_levels(x, iscale, nmax: int, out):
    np.multiply(x, iscale, out=out)
    np.rint(out, out=out)  # nearest_int: round half to even, in float32
    return np.clip(out, -nmax, nmax - 1, out=out)


def symmetric_search(x, w, nmax: int):
    """make_qx_quants(rmse_type=1): signed levels -nmax..nmax-1, scale d with x ~ d*l.

    Tries iscale = -(nmax + 0.1*s)/max for s = 0, then -9..9, and keeps a candidate only if
    (sum w*x*l)^2 > best * sum w*l^2, best = d * sum w*x*l of the kept one: the least weighted
    error after refitting d. `w` None means llama.cpp's default weights x^2. Returns (d, levels
    offset by nmax, 0..2*nmax-1; 0 in an all-zero block); the levels are recomputed once from the
    winning iscale, not copied at every improvement.
    """
    top = signed_absmax(x)
    zero = np.abs(top) < EPS
    safe = np.where(zero, F32(1), top)
    w = x * x if w is None else w
    wx = w * x
    lv = np.empty_like(x)
    tmp = np.empty_like(x)

    def sums(iscale):
        _signed_levels(x, iscale, nmax, lv)
        np.multiply(wx, lv, out=tmp)
        sumlx = _sum(tmp)
        np.multiply(w, lv, out=tmp)
        np.multiply(tmp, lv, out=tmp)
        return sumlx, _sum(tmp)

    best_is = F32(-nmax) / safe
    sumlx, suml2 = sums(best_is)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for s in range(-9, 10):
            if s == 0:
                continue
            iscale = -(F32(nmax) + F32(0.1) * F32(s)) / safe
            sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if better.any():
                scale = np.where(better, sumlx / suml2, scale)
                best = np.where(better, scale * sumlx, best)
                best_is = np.where(better, iscale, best_is)
    _signed_levels(x, best_is, nmax, lv)
    lv += nmax
    lv[:, zero] = 0
    return np.where(zero, F32(0), scale).astype(F32), lv


def min_scale_search(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool = False):
    """make_qkx2_quants / make_qkx3_quants: levels 0..nmax with x ~ d*l - m, m >= 0.

    Starts from the min/max fit, then for iscale = (nmax + rmin + rdelta*s)/(max - min),
    s = 0..nstep, rounds x - min, refits d and min by weighted least squares (min clamped to
    <= 0) and keeps the fit with the least weighted error (absolute error with use_mad, as
    Q2_K does). As in llama.cpp, an accepted fit's min becomes the origin of the later
    candidates. Returns (d, m, levels); the levels are recomputed once from the winning
    candidate's origin and iscale rather than copied at every improvement.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return _min_scale_search(x, w, nmax, rmin, rdelta, nstep, use_mad)


def _error(x, w, lv, d, mn, use_mad, out):
    """sum w * (d*l + mn - x)^2 (or |.|), in llama.cpp's order of operations."""
    np.multiply(lv, d, out=out)
    out += mn
    out -= x
    if use_mad:
        np.abs(out, out=out)
    else:
        out *= out
    out *= w
    return _sum(out)


def _min_scale_search(x, w, nmax, rmin, rdelta, nstep, use_mad):
    lo = np.minimum(x.min(axis=0), F32(0))
    hi = x.max(axis=0)
    flat = hi == lo  # llama.cpp returns at once: d 0, m -lo, levels 0
    hi = np.where(flat, lo + F32(1), hi)  # so no span below is 0; a flat block never moves
    sw = _sum(w)
    wx = w * x
    sx = _sum(wx)
    lv, tmp, tmp2 = np.empty_like(x), np.empty_like(x), np.empty_like(x)
    iscale = F32(nmax) / (hi - lo)
    best_d = F32(1) / iscale
    best_m = lo
    _levels(x, lo, iscale, nmax, lv)
    best = _error(x, w, lv, best_d, lo, use_mad, tmp)
    best[flat] = -np.inf
    won_origin, won_iscale = lo, iscale
    for s in range(nstep + 1):
        iscale = (F32(rmin) + F32(rdelta) * F32(s) + F32(nmax)) / (hi - best_m)
        origin = best_m
        _levels(x, origin, iscale, nmax, lv)
        np.multiply(w, lv, out=tmp)
        sl = _sum(tmp)
        sxl = _sum(np.multiply(tmp, x, out=tmp2))
        tmp *= lv
        sl2 = _sum(tmp)
        det = sw * sl2 - sl * sl
        mn = (sl2 * sx - sl * sxl) / det
        d = np.where(mn > 0, sxl / sl2, (sw * sxl - sx * sl) / det)
        mn = np.minimum(mn, F32(0))  # a positive min is clamped to 0 (and d refitted above)
        score = _error(x, w, lv, d, mn, use_mad, tmp)
        better = (score < best) & (det > 0)
        if better.any():
            best = np.where(better, score, best)
            best_d = np.where(better, d, best_d)
            best_m = np.where(better, mn, best_m)
            won_origin = np.where(better, origin, won_origin)
            won_iscale = np.where(better, iscale, won_iscale)
    _levels(x, won_origin, won_iscale, nmax, lv)
    lv[:, flat] = 0
    return np.where(flat, F32(0), best_d).astype(F32), (-best_m).astype(F32), lv


def _levels(x, origin, iscale, nmax: int, out):
    np.subtract(x, origin, out=out)
    out *= iscale
    np.rint(out, out=out)
    return np.clip(out, 0, nmax, out=out)


def _descend(x, w, wx, lv, sumlx, suml2, lo: int, hi: int, need_sl2_new: bool):
    """Up to five passes of llama.cpp's coordinate descent (make_q3_quants, make_qp_quants):
    each level in turn moves to its best value given the others, if that lowers the error.

    The passes run element by element but across all blocks at once; a block that stops
    changing stays unchanged, so running every block for the same passes gives llama.cpp's
    per-block early stop."""
    for _ in range(5):
        changed = False
        for i in range(x.shape[0]):
            wi, wxi, li = w[i], wx[i], lv[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.clip(np.rint(x[i] * sl2 / slx), lo, hi)
            slx_new = slx + wxi * new
            sl2_new = sl2 + wi * new * new
            take = (slx > 0) & (new != li) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            take &= (sl2_new > 0) if need_sl2_new else (sl2 > 0)
            if take.any():
                changed = True
                lv[i] = np.where(take, new, li)
                sumlx = np.where(take, slx_new, sumlx)
                suml2 = np.where(take, sl2_new, suml2)
        if not changed:
            break
    return sumlx, suml2


def q3_search(x, nmax: int = 4):
    """make_q3_quants(do_rmse=True): levels -nmax..nmax-1 from iscale = -nmax/max, weights x^2,
    then coordinate descent. Returns (d, levels offset by nmax; 0 in an all-zero block)."""
    top = signed_absmax(x)
    zero = np.abs(top) < EPS
    iscale = F32(-nmax) / np.where(zero, F32(1), top)
    lv = _signed_levels(x, iscale, nmax, np.empty_like(x))
    w = x * x
    wx = w * x
    sumlx, suml2 = _descend(x, w, wx, lv, _sum(wx * lv), _sum(w * lv * lv), -nmax, nmax - 1, True)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(suml2 > 0, sumlx / suml2, F32(0))
    lv += nmax
    lv[:, zero] = 0
    return np.where(zero, F32(0), d).astype(F32), lv


def positive_search(x, nmax: int, w):
    """make_qp_quants: quantize non-negative values (the sub-block scales of a super-block) to
    0..nmax with one scale, weighted by w: nine candidate scales, then coordinate descent."""
    top = np.maximum(x.max(axis=0), F32(0))
    zero = top < EPS
    safe = np.where(zero, F32(1), top)
    best_is = F32(nmax) / safe
    diff = x - (F32(1) / best_is) * np.rint(best_is * x)  # the first candidate is not clamped
    best_mse = _sum(w * diff * diff)
    for s in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale = (F32(0.1) * F32(s) + F32(nmax)) / safe
        diff = x - (F32(1) / iscale) * np.minimum(np.rint(iscale * x), nmax)
        mse = _sum(w * diff * diff)
        better = mse < best_mse
        best_mse = np.where(better, mse, best_mse)
        best_is = np.where(better, iscale, best_is)
    lv = np.minimum(np.rint(best_is * x), nmax)
    wx = w * x
    sumlx, suml2 = _descend(x, w, wx, lv, _sum(wx * lv), _sum(w * lv * lv), -(2**30), nmax, False)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(suml2 > 0, sumlx / suml2, F32(0))
    lv[:, zero] = 0
    return np.where(zero, F32(0), d).astype(F32), lv
