"""GGUF block encoders for the types `gguf.quants` cannot write: the K-quants (Q2_K..Q6_K), and
Q4_0/Q4_1/Q5_0/Q5_1 weighted by an importance matrix.

Each encoder follows llama.cpp's ggml-quants.c: the reference path (quantize_row_*_ref) when no
importance matrix is given, the weighted path (quantize_row_*_impl) when one is, with the scale
searches of nekotune.export.quant_search. Byte layouts are ggml's block structs, the ones
`gguf.quants` dequantizes (the tests round-trip through it). Tensors are encoded in chunks of
rows on a few threads (NumPy releases the GIL inside its loops), so memory stays at a few chunks
beyond the tensor and its output.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nekotune.export import quant_search as qs

F32 = np.float32
QK_K = 256
CHUNK_ELEMENTS = 1 << 17  # about 512 KB of float32 per chunk: the temporaries stay in cache


def _half(a):
    """Store as fp16 and read back, as llama.cpp does before requantizing with the stored scale."""
    h = np.asarray(a, dtype=F32).astype(np.float16)
    return h, h.astype(F32)


def _columns(x, n: int):
    """(rows, cols) -> blocks of n as columns, shape (n, blocks)."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def _block_weights(qw, nblocks: int, n: int):
    """The importance of each element of each n-block, as columns: block b of a chunk of whole
    rows is block b % (blocks per row) of the importance vector (one value per column)."""
    if qw is None:
        return None
    per_row = _columns(qw.reshape(1, -1), n)
    return per_row[:, np.arange(nblocks) % per_row.shape[1]]


def _sigma2(x, per: int, factor: float, n: int):
    """llama.cpp's sigma2 = factor * sum(x^2) / per over `per` elements, repeated for each
    n-block; summed element 0 first like its loop (quant_search's note on rounding)."""
    xc = _columns(x, per)
    s = F32(factor) * qs._sum(xc * xc) / F32(per)
    return np.repeat(s, per // n)


def _requant(xc, d, m, nmax: int, searched):
    """Levels for the stored (fp16-rounded, 6-bit) sub-block scale and min. Where the stored
    scale is 0 llama.cpp keeps the search's levels (any level decodes to the same value then);
    so do we, for the same bytes."""
    ok = d != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.rint((xc + m) / np.where(ok, d, F32(1)))
    np.clip(lv, 0, nmax, out=lv)
    lv[:, ~ok] = searched[:, ~ok]
    return lv


def _byte_levels(r, top: int):
    """min(top, (uint8_t)nearest_int(v)): llama.cpp stores the rounded scale in a byte first, so
    a negative one wraps (to at least `top`) instead of clamping to 0."""
    return np.minimum(np.mod(r, 256), top)


def _rows(lv, nblocks: int, n: int):
    """Columns of levels back to (blocks, n) uint8, for packing."""
    return lv.T.reshape(nblocks, n).astype(np.uint8)


# -- Q4_K and Q5_K: 8 sub-blocks of 32, 6-bit scales and mins ---------------------------------
def _scale_min_k(x, qw, nmax: int):
    """Sub-block scales and mins, quantized to 6 bits against one fp16 d and dmin per super-block."""
    nsb = x.size // QK_K
    xc = _columns(x, 32)
    if qw is None:  # quantize_row_q{4,5}_K_ref
        w = np.sqrt((xc * xc).sum(axis=0) / 32) + np.abs(xc)
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        d, m, searched = qs.min_scale_search(xc, w, nmax, rmin, rdelta, nstep)
        d, m = d.reshape(nsb, 8), m.reshape(nsb, 8)
        top_d = np.maximum(d.max(axis=1), 0)
        top_m = np.maximum(m.max(axis=1), 0)
        with np.errstate(divide="ignore"):
            inv_d = np.where(top_d > 0, F32(63) / top_d, F32(0))
            inv_m = np.where(top_m > 0, F32(63) / top_m, F32(0))
        ls = _byte_levels(np.rint(inv_d[:, None] * d), 63)
        lm = _byte_levels(np.rint(inv_m[:, None] * m), 63)
        dd, dmin = top_d / F32(63), top_m / F32(63)
    else:  # quantize_row_q{4,5}_K_impl
        w = _block_weights(qw, xc.shape[1], 32)
        w = w * np.sqrt(_sigma2(x, QK_K, 2.0, 32) + xc * xc)
        d, m, searched = qs.min_scale_search(xc, w, nmax, -0.9, 0.05, 36)
        sw = qs._sum(w).reshape(nsb, 8).T
        dd, ls = qs.positive_search(np.ascontiguousarray(d.reshape(nsb, 8).T), 63, sw)
        dmin, lm = qs.positive_search(np.ascontiguousarray(m.reshape(nsb, 8).T), 63, sw)
        ls, lm = ls.T, lm.T
    dd16, ddf = _half(dd)
    dm16, dmf = _half(dmin)
    lv = _requant(xc, (ddf[:, None] * ls).reshape(-1), (dmf[:, None] * lm).reshape(-1), nmax, searched)
    return dd16, dm16, ls.astype(np.uint8), lm.astype(np.uint8), _rows(lv, nsb, QK_K)


def _pack_scales_k(ls, lm):
    """ggml's 12-byte layout of eight 6-bit scales and mins (get_scale_min_k4)."""
    lo, hi = ls[:, :4], ls[:, 4:]
    mlo, mhi = lm[:, :4], lm[:, 4:]
    return np.concatenate([lo | ((hi >> 4) << 6), mlo | ((mhi >> 4) << 6), (hi & 0xF) | ((mhi & 0xF) << 4)], axis=1)


def encode_q4_k(x, qw=None):
    dd, dm, ls, lm, lv = _scale_min_k(x, qw, 15)
    q = lv.reshape(-1, 4, 2, 32)
    packed = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([dd.view(np.uint8).reshape(-1, 2), dm.view(np.uint8).reshape(-1, 2),
                           _pack_scales_k(ls, lm), packed], axis=1)


def encode_q5_k(x, qw=None):
    dd, dm, ls, lm, lv = _scale_min_k(x, qw, 31)
    q = lv.reshape(-1, 4, 2, 32)
    low = q & 0xF
    packed = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 8, 32)  # bit 2c+h of qh[l] is the 5th bit of element 64c+32h+l
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for bit in range(8):
        qh |= high[:, bit] << bit
    return np.concatenate([dd.view(np.uint8).reshape(-1, 2), dm.view(np.uint8).reshape(-1, 2),
                           _pack_scales_k(ls, lm), qh, packed], axis=1)


# -- Q6_K: 16 sub-blocks of 16, signed 8-bit scales ---------------------------------------------
def _requant_signed(xc, dj, nmax: int, searched):
    """Levels -nmax..nmax-1 (offset by nmax) for the stored sub-block scales dj; where dj is 0,
    the search's levels, as llama.cpp keeps them (see _requant)."""
    ok = dj != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lv = np.rint(xc / np.where(ok, dj, F32(1)))
    np.clip(lv, -nmax, nmax - 1, out=lv)
    lv += nmax
    lv[:, ~ok] = searched[:, ~ok]
    return lv


def encode_q6_k(x, qw=None):
    nsb = x.size // QK_K
    xc = _columns(x, 16)
    w = None if qw is None else _block_weights(qw, xc.shape[1], 16)
    d, searched = qs.symmetric_search(xc, w, 32)
    d = d.reshape(nsb, 16)
    top = qs.signed_absmax(np.ascontiguousarray(d.T))
    blank = np.abs(top) < qs.EPS  # llama.cpp writes such a super-block as all zero bytes
    with np.errstate(divide="ignore"):
        iscale = np.where(blank, F32(0), F32(-128) / np.where(blank, F32(1), top))
        dd = np.where(blank, F32(0), F32(1) / np.where(blank, F32(1), iscale))
    sc = np.minimum(np.rint(iscale[:, None] * d), 127).astype(np.int8)
    sc[blank] = 0
    dd16, ddf = _half(dd)
    lv = _requant_signed(xc, (ddf[:, None] * sc).reshape(-1), 32, searched)
    q = _rows(lv, nsb, QK_K)
    q[blank] = 0
    q = q.reshape(-1, 2, 4, 32)
    low, high = q & 0xF, q >> 4
    ql = (low[:, :, 0:2] | (low[:, :, 2:4] << 4)).reshape(-1, 128)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), dd16.view(np.uint8).reshape(-1, 2)], axis=1)


# -- Q3_K: 16 sub-blocks of 16, signed 6-bit scales, 2 bits + a high-bit mask -----------------
def _pack_2bit(lv):
    """Four 2-bit levels per byte: byte 32h+l holds elements 128h+l, +32, +64, +96."""
    q = (lv & 3).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _q3_scales(xc, qw, x, nsb: int):
    """The sixteen 6-bit scales (offset by 32) and the super-block scale, with the levels
    the sub-block search found."""
    if qw is None:  # quantize_row_q3_K_ref
        d, searched = qs.q3_search(xc, 4)
        d = d.reshape(nsb, 16)
        top = qs.signed_absmax(np.ascontiguousarray(d.T))
        nz = top != 0
        with np.errstate(divide="ignore"):
            iscale = np.where(nz, F32(-32) / np.where(nz, top, F32(1)), F32(0))
            dd = np.where(nz, F32(1) / np.where(nz, iscale, F32(1)), F32(0))
        ls = np.clip(np.rint(iscale[:, None] * d), -32, 31) + 32
        ls[~nz] = 0
        return ls, dd, searched
    w = _block_weights(qw, xc.shape[1], 16)  # quantize_row_q3_K_impl
    w = w * np.sqrt(_sigma2(x, QK_K, 2.0, 16) + xc * xc)
    d, searched = qs.symmetric_search(xc, w, 4)
    dT = np.ascontiguousarray(d.reshape(nsb, 16).T)
    swT = np.ascontiguousarray(qs._sum(w).reshape(nsb, 16).T)
    dd, ls = qs.symmetric_search(dT, swT, 32)
    return ls.T, dd, searched


def encode_q3_k(x, qw=None):
    nsb = x.size // QK_K
    xc = _columns(x, 16)
    ls, dd, searched = _q3_scales(xc, qw, x, nsb)
    ls = ls.astype(np.uint8)
    dd16, ddf = _half(dd)
    q = _rows(_requant_signed(xc, (ddf[:, None] * (ls.astype(F32) - 32)).reshape(-1), 4, searched), nsb, QK_K)
    high = (q > 3).reshape(-1, 8, 32).astype(np.uint8)  # bit j//32 of hmask[j%32]
    hmask = np.zeros((nsb, 32), dtype=np.uint8)
    for bit in range(8):
        hmask |= high[:, bit] << bit
    scales = np.concatenate([(ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4),
                             np.bitwise_or.reduce((ls.reshape(-1, 4, 4) >> 4) << (2 * np.arange(4)[None, :, None]),
                                                  axis=1).astype(np.uint8)], axis=1)
    return np.concatenate([hmask, _pack_2bit(q), scales, dd16.view(np.uint8).reshape(-1, 2)], axis=1)


# -- Q2_K: 16 sub-blocks of 16, 4-bit scales and mins -----------------------------------------
def encode_q2_k(x, qw=None):
    nsb = x.size // QK_K
    xc = _columns(x, 16)
    if qw is None:  # quantize_row_q2_K_ref
        d, m, searched = qs.min_scale_search(xc, np.abs(xc), 3, -0.5, 0.1, 15, use_mad=True)
        d, m = d.reshape(nsb, 16), m.reshape(nsb, 16)
        top_d, top_m = np.maximum(d.max(axis=1), 0), np.maximum(m.max(axis=1), 0)
        with np.errstate(divide="ignore"):
            ls = _byte_levels(np.rint(np.where(top_d > 0, F32(15) / top_d, F32(0))[:, None] * d), 15)
            lm = _byte_levels(np.rint(np.where(top_m > 0, F32(15) / top_m, F32(0))[:, None] * m), 15)
        dd, dmin = top_d / F32(15), top_m / F32(15)
    else:  # quantize_row_q2_K_impl
        w = _block_weights(qw, xc.shape[1], 16)
        w = w * np.sqrt(_sigma2(x, QK_K, 1.0, 16) + xc * xc)
        d, m, searched = qs.min_scale_search(xc, w, 3, -0.9, 0.05, 36)
        sw = qs._sum(w).reshape(nsb, 16).T
        dd, ls = qs.positive_search(np.ascontiguousarray(d.reshape(nsb, 16).T), 15, sw)
        dmin, lm = qs.positive_search(np.ascontiguousarray(m.reshape(nsb, 16).T), 15, sw)
        ls, lm = ls.T, lm.T
    dd16, ddf = _half(dd)
    dm16, dmf = _half(dmin)
    lv = _requant(xc, (ddf[:, None] * ls).reshape(-1), (dmf[:, None] * lm).reshape(-1), 3, searched)
    scales = ls.astype(np.uint8) | (lm.astype(np.uint8) << 4)
    return np.concatenate([scales, _pack_2bit(_rows(lv, nsb, QK_K)), dd16.view(np.uint8).reshape(-1, 2),
                           dm16.view(np.uint8).reshape(-1, 2)], axis=1)

# -- 32-blocks with an importance matrix (quantize_row_q{4,5}_{0,1}_impl) ----------------------
def _legacy_weights(x, qw):
    """Per 32-block weights: qw * sqrt(sigma2 + x^2), sigma2 = mean(x^2) over the whole ROW
    (summed element 0 first, as llama.cpp's loop does: hence the transposed copy)."""
    ncols = x.shape[1]
    xc = _columns(x, 32)
    xt = np.ascontiguousarray(x.T)
    sigma2 = np.repeat(qs._sum(xt * xt) / F32(ncols), ncols // 32)
    return xc, _block_weights(qw, xc.shape[1], 32) * np.sqrt(sigma2 + xc * xc)


def _nibbles(lv):
    q = lv.reshape(-1, 2, 16)
    return (q[:, 0] & 0xF) | ((q[:, 1] & 0xF) << 4)


def _fifth_bits(lv):
    return np.packbits((lv >> 4) & 1, axis=1, bitorder="little")


def encode_q4_0(x, qw):
    xc, w = _legacy_weights(x, qw)
    d, lv = qs.symmetric_search(xc, w, 8)
    lv = _rows(lv, xc.shape[1], 32)
    return np.concatenate([_half(d)[0].view(np.uint8).reshape(-1, 2), _nibbles(lv)], axis=1)


def encode_q5_0(x, qw):
    xc, w = _legacy_weights(x, qw)
    d, lv = qs.symmetric_search(xc, w, 16)
    lv = _rows(lv, xc.shape[1], 32)
    return np.concatenate([_half(d)[0].view(np.uint8).reshape(-1, 2), _fifth_bits(lv), _nibbles(lv)], axis=1)


def _encode_x_1(x, qw, nmax: int):
    xc, w = _legacy_weights(x, qw)
    d, m, lv = qs.min_scale_search(xc, w, nmax, -0.9, 0.05, 36)
    lv = _rows(lv, xc.shape[1], 32)
    head = [_half(d)[0].view(np.uint8).reshape(-1, 2), _half(-m)[0].view(np.uint8).reshape(-1, 2)]
    return np.concatenate(head + ([_fifth_bits(lv)] if nmax == 31 else []) + [_nibbles(lv)], axis=1)


def encode_q4_1(x, qw):
    return _encode_x_1(x, qw, 15)


def encode_q5_1(x, qw):
    return _encode_x_1(x, qw, 31)


# -- the driver ------------------------------------------------------------------------------
def _encoders():
    from gguf import GGMLQuantizationType as Q

    return {Q.Q2_K: encode_q2_k, Q.Q3_K: encode_q3_k, Q.Q4_K: encode_q4_k, Q.Q5_K: encode_q5_k,
            Q.Q6_K: encode_q6_k, Q.Q4_0: encode_q4_0, Q.Q4_1: encode_q4_1, Q.Q5_0: encode_q5_0,
            Q.Q5_1: encode_q5_1}


K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def quantize(data, qtype, imatrix=None, threads: int | None = None):
    """A float array (rows, cols) -> GGUF bytes (rows, bytes per row) in `qtype`.

    K-quants are encoded here; Q4_0..Q5_1 too when `imatrix` (one importance per column) is
    given; everything else (and those without imatrix, where llama.cpp uses the plain reference
    rounding gguf.quants implements) goes to gguf.quants. `data` may be float16: chunks are
    converted to float32 one at a time.
    """
    import gguf

    encoder = _encoders().get(qtype)
    if encoder is None or (qtype.name not in K_QUANTS and imatrix is None):
        return gguf.quants.quantize(np.asarray(data, dtype=F32), qtype)
    rows = data.reshape(-1, data.shape[-1])
    n_rows, n_cols = rows.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if n_cols % block:
        raise ValueError(f"row length {n_cols} is not a multiple of the {qtype.name} block size {block}")
    qw = None if imatrix is None else np.asarray(imatrix, dtype=F32).reshape(-1)
    if qw is not None and qw.size != n_cols:
        raise ValueError(f"importance vector has {qw.size} values for rows of {n_cols}")
    out = np.empty((n_rows, n_cols // block * size), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS // n_cols)

    def work(start: int) -> None:
        part = np.asarray(rows[start:start + step], dtype=F32)
        out[start:start + part.shape[0]] = encoder(part, qw).reshape(part.shape[0], -1)

    starts = range(0, n_rows, step)
    workers = min(threads or os.cpu_count() or 1, len(starts))
    if workers <= 1:
        for s in starts:
            work(s)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, starts))
    return out.reshape(*data.shape[:-1], -1)
