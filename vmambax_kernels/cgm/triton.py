"""Triton backend of the CGM gate (SPEC.md section 2): one forward and one backward kernel.

Notation: x_a = X_ct, x_b = X_pet, t = one of the 18 (map, tap) pairs. Both 3x3 convolutions
reduce over all 2C channels before any output can be gated, so a program owns a band of TH full
rows of one plane and walks it in chunks of BLOCK_P pixels, in two phases per chunk:

  phase 1 (channel reduction, on the band plus one halo row above and below):
      forward   Q[p, t]  = sum_c xa[c, p] * Wa[c, t] + xb[c, p] * Wb[c, t]       (tl.dot)
      backward  dz_m[p]  = s_m (1 - s_m) * sum_c c_m[c] dy_m[c, p] x_m[c, p]
    stored in a small per-program ring buffer in global memory (it stays in L1/L2);
  phase 2 (per channel, own pixels only), after a CTA barrier:
      forward   z_m[p] = sum of the 9 shifted Q[p + off, t] of map m; s = sigmoid(z);
                y_m = x_m * (1 + c_m s_m)   (or x_m * c_m s_m)
      backward  dzs[p, t] = dz_m[p - off];  dx_m = dy_m (1 + c_m s_m) + dzs @ W_m^T;
                dW_m += x_m^T @ dzs;  dc_m += sum_p dy_m x_m s_m.

Phase 1 runs one chunk ahead of phase 2, so between the two reads of a pixel only about
2 * BLOCK_P + W pixels of all channels are touched: the second read hits L2 and each input comes
from memory about once. Wa/Wb pack the two weights by input: column t < 9 feeds z_ct, t >= 9 z_pet.

The convolution products run on tensor cores in fp32 accuracy: an fp32 operand is split into
three tf32-exact parts (hi, mid, lo) whose products are exact in fp32; bf16/fp16 activations are
already tf32-exact. The forward saves s (Bt, 2, H, W) in fp32 for the backward.

Runs on CUDA GPUs, or on CPU tensors under TRITON_INTERPRET=1 (tests). Kernels are defined on the
first launch, because Triton picks compiling or interpreting when a kernel is defined.
"""
from __future__ import annotations

import os

import torch

from . import reference

_MIN_TRITON = "3.6"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NT = 32  # 18 (map, tap) columns padded to a tl.dot size


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def availability() -> str | None:
    """None when this backend can run here, else why not. Never raises."""
    try:
        import triton
        from packaging.version import Version
    except ImportError as exc:
        return f"Triton is not installed ({exc}): pip install 'triton>={_MIN_TRITON}'"
    try:
        if Version(triton.__version__).release < Version(_MIN_TRITON).release:
            return f"Triton {triton.__version__} is too old: pip install 'triton>={_MIN_TRITON}'"
    except Exception as exc:  # an odd version string must not break available_backends()
        return f"cannot read the Triton version {getattr(triton, '__version__', '?')!r}: {exc}"
    if _interpreting() or torch.cuda.is_available():
        return None
    return ("no CUDA GPU is visible (torch.cuda.is_available() is False); "
            "set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors (slow, for tests)")


# ----------------------------------------------------------------------------------------------
# Kernels (plain functions here; _kernels() turns them into Triton functions on first use)
# ----------------------------------------------------------------------------------------------
tl = None  # triton.language, bound by _kernels(): importing Triton is left to the first launch


def _tf32_trunc(x):
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


def _split(a, EXACT: constexpr):
    """Three tf32-exact parts (11 + 11 + 2 significant bits) that sum to the fp32 ``a``; ``a``
    itself (parts 1 and 2 unused) when it is already tf32-exact (bf16/fp16 data)."""
    if EXACT:
        a0 = a
        a1 = a
        a2 = a
    else:
        a0 = _tf32_trunc(a)
        r = a - a0
        a1 = _tf32_trunc(r)
        a2 = r - a1
    return a0, a1, a2


def _mm(a0, a1, a2, b0, b1, b2, acc, A_EXACT: constexpr):
    """acc + (a0 + a1 + a2) @ (b0 + b1 + b2) in fp32 accuracy on tf32 tensor cores: products of
    tf32-exact parts are exact in fp32; the cross terms left out are below 2**-33 relative."""
    acc = tl.dot(a0, b0, acc, input_precision="tf32")
    acc = tl.dot(a0, b1, acc, input_precision="tf32")
    acc = tl.dot(a0, b2, acc, input_precision="tf32")
    if not A_EXACT:
        acc = tl.dot(a1, b0, acc, input_precision="tf32")
        acc = tl.dot(a2, b0, acc, input_precision="tf32")
        acc = tl.dot(a1, b1, acc, input_precision="tf32")
    return acc


def _w_tiles(wk_ptr, row0, C, ch, mc, TRANS: constexpr):
    """The three parts of rows row0 + ch of the packed weights, (BLOCK_C, 32) or transposed."""
    t = tl.arange(0, 32)
    if TRANS:
        offs = (row0 + ch[None, :]) * 32 + t[:, None]
        m = mc[None, :]
    else:
        offs = (row0 + ch[:, None]) * 32 + t[None, :]
        m = mc[:, None]
    part = 2 * C * 32
    return (tl.load(wk_ptr + offs, mask=m, other=0.0), tl.load(wk_ptr + part + offs, mask=m, other=0.0),
            tl.load(wk_ptr + 2 * part + offs, mask=m, other=0.0))


def _tile(ptr, b, sb, sc, sp, pix, mp, ch, mc):
    """(BLOCK_P, BLOCK_C) fp32 tile of a (Bt, C, H*W)-indexed tensor; zero where masked."""
    offs = b.to(tl.int64) * sb + ch[None, :].to(tl.int64) * sc + pix[:, None].to(tl.int64) * sp
    return tl.load(ptr + offs, mask=mp[:, None] & mc[None, :], other=0.0).to(tl.float32)


def _store_tile(ptr, val, b, sb, sc, sp, pix, mp, ch, mc, INTERP: constexpr):
    if INTERP:
        if ptr.dtype.element_ty == tl.bfloat16:
            # The interpreter truncates fp32 -> bf16; round to nearest even as the GPU does.
            bits = val.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            val = bits.to(tl.float32, bitcast=True)
    offs = b.to(tl.int64) * sb + ch[None, :].to(tl.int64) * sc + pix[:, None].to(tl.int64) * sp
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=mp[:, None] & mc[None, :])


def _neighbours(pix, mp, H, W, SIGN: constexpr):
    """For each pixel and column t (BLOCK_P, NT): the pixel p + SIGN * off(t), whether it is in
    the plane, and the map m of column t (t // 9)."""
    t = tl.arange(0, 32)
    k = t % 9
    dy = k // 3 - 1
    dx = k % 3 - 1
    h = pix // W
    w = pix - h * W
    nh = h[:, None] + SIGN * dy[None, :]
    nw = w[:, None] + SIGN * dx[None, :]
    ok = mp[:, None] & (t[None, :] < 18) & (nh >= 0) & (nh < H) & (nw >= 0) & (nw < W)
    return nh * W + nw, ok, t // 9


def _band(tile, n_bands, TH, H, W):
    b = tile // n_bands
    o_lo = (tile % n_bands) * TH * W
    o_hi = tl.minimum(o_lo + TH * W, H * W)
    return b, o_lo, o_hi, tl.maximum(o_lo - W, 0), tl.minimum(o_hi + W, H * W)


def _cgm_fwd_kernel(xa_ptr, xb_ptr, ya_ptr, yb_ptr, s_ptr, ca_ptr, cb_ptr, wk_ptr, ring_ptr,
                    C, H, W, n_bands, n_tiles, TH, RING,
                    sxa_b, sxa_c, sxa_p, sxb_b, sxb_c, sxb_p,
                    sya_b, sya_c, sya_p, syb_b, syb_c, syb_p,
                    RESIDUAL: constexpr, X_EXACT: constexpr, INTERP: constexpr,
                    BLOCK_P: constexpr, BLOCK_C: constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    HW = H * W
    ring = ring_ptr + pid.to(tl.int64) * 32 * RING   # [32, RING] fp32: Q[t, p % RING]
    t = tl.arange(0, 32)
    for tile in range(pid, n_tiles, nprog):
        b, o_lo, o_hi, x_lo, x_hi = _band(tile, n_bands, TH, H, W)
        done = x_lo
        tl.debug_barrier()  # the previous tile's phase 2 has read the ring
        for p0 in range(o_lo, o_hi, BLOCK_P):
            need = tl.minimum(p0 + BLOCK_P + W + 1, x_hi)
            while done < need:  # phase 1: Q on the next chunk of the band + halo
                pe = done + tl.arange(0, BLOCK_P)
                me = pe < x_hi
                acc = tl.zeros((BLOCK_P, 32), dtype=tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    ch = c0 + tl.arange(0, BLOCK_C)
                    mc = ch < C
                    wa0, wa1, wa2 = _w_tiles(wk_ptr, 0, C, ch, mc, False)
                    wb0, wb1, wb2 = _w_tiles(wk_ptr, C, C, ch, mc, False)
                    xa = _tile(xa_ptr, b, sxa_b, sxa_c, sxa_p, pe, me, ch, mc)
                    xb = _tile(xb_ptr, b, sxb_b, sxb_c, sxb_p, pe, me, ch, mc)
                    xa0, xa1, xa2 = _split(xa, X_EXACT)
                    acc = _mm(xa0, xa1, xa2, wa0, wa1, wa2, acc, X_EXACT)
                    xb0, xb1, xb2 = _split(xb, X_EXACT)
                    acc = _mm(xb0, xb1, xb2, wb0, wb1, wb2, acc, X_EXACT)
                tl.store(ring + t[None, :] * RING + (pe & (RING - 1))[:, None], acc,
                         mask=me[:, None] & (t[None, :] < 18))
                done += BLOCK_P
            tl.debug_barrier()  # Q of the chunk and its halo is in the ring
            # phase 2: spatial gates of the chunk, then every channel gated
            pix = p0 + tl.arange(0, BLOCK_P)
            mp = pix < o_hi
            nb, ok, m = _neighbours(pix, mp, H, W, 1)
            q = tl.load(ring + t[None, :] * RING + (nb & (RING - 1)), mask=ok, other=0.0)
            sa = tl.sigmoid(tl.sum(tl.where(m[None, :] == 0, q, 0.0), axis=1))
            sb = tl.sigmoid(tl.sum(tl.where(m[None, :] == 1, q, 0.0), axis=1))
            s_row = s_ptr + b.to(tl.int64) * 2 * HW
            tl.store(s_row + pix, sa, mask=mp)
            tl.store(s_row + HW + pix, sb, mask=mp)
            for c0 in range(0, C, BLOCK_C):
                ch = c0 + tl.arange(0, BLOCK_C)
                mc = ch < C
                ga = tl.load(ca_ptr + b * C + ch, mask=mc, other=0.0)[None, :] * sa[:, None]
                gb = tl.load(cb_ptr + b * C + ch, mask=mc, other=0.0)[None, :] * sb[:, None]
                if RESIDUAL:
                    ga += 1.0
                    gb += 1.0
                xa = _tile(xa_ptr, b, sxa_b, sxa_c, sxa_p, pix, mp, ch, mc)
                _store_tile(ya_ptr, xa * ga, b, sya_b, sya_c, sya_p, pix, mp, ch, mc, INTERP)
                xb = _tile(xb_ptr, b, sxb_b, sxb_c, sxb_p, pix, mp, ch, mc)
                _store_tile(yb_ptr, xb * gb, b, syb_b, syb_c, syb_p, pix, mp, ch, mc, INTERP)
            tl.debug_barrier()  # phase 1 of the next chunk may overwrite what was read


def _cgm_bwd_kernel(ga_ptr, gb_ptr, xa_ptr, xb_ptr, s_ptr, ca_ptr, cb_ptr, wk_ptr, ring_ptr,
                    dxa_ptr, dxb_ptr, dc_ptr, dw_ptr,
                    C, H, W, n_bands, n_tiles, TH, RING,
                    sga_b, sga_c, sga_p, sgb_b, sgb_c, sgb_p,
                    sxa_b, sxa_c, sxa_p, sxb_b, sxb_c, sxb_p,
                    sda_b, sda_c, sda_p, sdb_b, sdb_c, sdb_p,
                    RESIDUAL: constexpr, X_EXACT: constexpr, INTERP: constexpr,
                    BLOCK_P: constexpr, BLOCK_C: constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    HW = H * W
    ring = ring_ptr + pid.to(tl.int64) * 2 * RING    # [2, RING] fp32: dz_m[p % RING]
    dw_prog = dw_ptr + pid.to(tl.int64) * 2 * C * 18  # this program's partial dW, [2C, 18]
    t = tl.arange(0, 32)
    for tile in range(pid, n_tiles, nprog):
        b, o_lo, o_hi, x_lo, x_hi = _band(tile, n_bands, TH, H, W)
        s_row = s_ptr + b.to(tl.int64) * 2 * HW
        dc_tile = dc_ptr + tile * 2 * C  # this tile's partial dc, [2, C]
        done = x_lo
        tl.debug_barrier()
        for p0 in range(o_lo, o_hi, BLOCK_P):
            need = tl.minimum(p0 + BLOCK_P + W + 1, x_hi)
            while done < need:  # phase 1: dz on the next chunk of the band + halo
                pe = done + tl.arange(0, BLOCK_P)
                me = pe < x_hi
                dsa = tl.zeros((BLOCK_P,), dtype=tl.float32)
                dsb = tl.zeros((BLOCK_P,), dtype=tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    ch = c0 + tl.arange(0, BLOCK_C)
                    mc = ch < C
                    ca = tl.load(ca_ptr + b * C + ch, mask=mc, other=0.0)
                    cb = tl.load(cb_ptr + b * C + ch, mask=mc, other=0.0)
                    xa = _tile(xa_ptr, b, sxa_b, sxa_c, sxa_p, pe, me, ch, mc)
                    gya = _tile(ga_ptr, b, sga_b, sga_c, sga_p, pe, me, ch, mc)
                    dsa += tl.sum(gya * xa * ca[None, :], axis=1)
                    xb = _tile(xb_ptr, b, sxb_b, sxb_c, sxb_p, pe, me, ch, mc)
                    gyb = _tile(gb_ptr, b, sgb_b, sgb_c, sgb_p, pe, me, ch, mc)
                    dsb += tl.sum(gyb * xb * cb[None, :], axis=1)
                sa = tl.load(s_row + pe, mask=me, other=0.0)
                sb = tl.load(s_row + HW + pe, mask=me, other=0.0)
                tl.store(ring + (pe & (RING - 1)), dsa * sa * (1.0 - sa), mask=me)
                tl.store(ring + RING + (pe & (RING - 1)), dsb * sb * (1.0 - sb), mask=me)
                done += BLOCK_P
            tl.debug_barrier()
            # phase 2: dzs[p, t] = dz_m[p - off(t)], then every channel
            pix = p0 + tl.arange(0, BLOCK_P)
            mp = pix < o_hi
            nb, ok, m = _neighbours(pix, mp, H, W, -1)
            dzs = tl.load(ring + m[None, :] * RING + (nb & (RING - 1)), mask=ok, other=0.0)
            dz0, dz1, dz2 = _split(dzs, False)
            sa = tl.load(s_row + pix, mask=mp, other=0.0)
            sb = tl.load(s_row + HW + pix, mask=mp, other=0.0)
            for c0 in range(0, C, BLOCK_C):
                ch = c0 + tl.arange(0, BLOCK_C)
                mc = ch < C
                ca = tl.load(ca_ptr + b * C + ch, mask=mc, other=0.0)
                cb = tl.load(cb_ptr + b * C + ch, mask=mc, other=0.0)
                xa = _tile(xa_ptr, b, sxa_b, sxa_c, sxa_p, pix, mp, ch, mc)
                gya = _tile(ga_ptr, b, sga_b, sga_c, sga_p, pix, mp, ch, mc)
                gate_a = ca[None, :] * sa[:, None]
                if RESIDUAL:
                    gate_a += 1.0
                wa0, wa1, wa2 = _w_tiles(wk_ptr, 0, C, ch, mc, True)
                dxa = _mm(dz0, dz1, dz2, wa0, wa1, wa2, gya * gate_a, False)
                _store_tile(dxa_ptr, dxa, b, sda_b, sda_c, sda_p, pix, mp, ch, mc, INTERP)
                xa0, xa1, xa2 = _split(tl.trans(xa), X_EXACT)
                dwa = _mm(xa0, xa1, xa2, dz0, dz1, dz2, tl.zeros((BLOCK_C, 32), dtype=tl.float32), X_EXACT)
                xb = _tile(xb_ptr, b, sxb_b, sxb_c, sxb_p, pix, mp, ch, mc)
                gyb = _tile(gb_ptr, b, sgb_b, sgb_c, sgb_p, pix, mp, ch, mc)
                gate_b = cb[None, :] * sb[:, None]
                if RESIDUAL:
                    gate_b += 1.0
                wb0, wb1, wb2 = _w_tiles(wk_ptr, C, C, ch, mc, True)
                dxb = _mm(dz0, dz1, dz2, wb0, wb1, wb2, gyb * gate_b, False)
                _store_tile(dxb_ptr, dxb, b, sdb_b, sdb_c, sdb_p, pix, mp, ch, mc, INTERP)
                xb0, xb1, xb2 = _split(tl.trans(xb), X_EXACT)
                dwb = _mm(xb0, xb1, xb2, dz0, dz1, dz2, tl.zeros((BLOCK_C, 32), dtype=tl.float32), X_EXACT)
                # partial sums owned by this program; the barriers order the read-modify-writes
                wa_ptrs = dw_prog + ch[:, None] * 18 + t[None, :]
                wb_ptrs = dw_prog + (C + ch[:, None]) * 18 + t[None, :]
                mw = mc[:, None] & (t[None, :] < 18)
                tl.store(wa_ptrs, tl.load(wa_ptrs, mask=mw, other=0.0) + dwa, mask=mw)
                tl.store(wb_ptrs, tl.load(wb_ptrs, mask=mw, other=0.0) + dwb, mask=mw)
                dca = tl.sum(gya * xa * sa[:, None], axis=0)
                dcb = tl.sum(gyb * xb * sb[:, None], axis=0)
                tl.store(dc_tile + ch, tl.load(dc_tile + ch, mask=mc, other=0.0) + dca, mask=mc)
                tl.store(dc_tile + C + ch, tl.load(dc_tile + C + ch, mask=mc, other=0.0) + dcb, mask=mc)
            tl.debug_barrier()


_HELPERS = ("_tf32_trunc", "_split", "_mm", "_w_tiles", "_tile", "_store_tile", "_neighbours", "_band")
_KERNELS = ("_cgm_fwd_kernel", "_cgm_bwd_kernel")
_built: dict = {}


def _kernels() -> dict:
    if not _built:
        import triton
        import triton.language
        g = globals()
        g["tl"] = triton.language
        for name in _HELPERS + _KERNELS:  # helpers first: kernels find them by global name
            g[name] = triton.jit(g[name])
            _built[name] = g[name]
        if _interpreting():
            _fix_interpreter_index()
    return _built


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter holds scalar arguments as 1-element arrays and turns them into
    loop bounds with int(array), which numpy >= 2.3 rejects; give its tensors an __index__."""
    try:
        from triton.runtime import interpreter
        orig = interpreter._patch_lang_tensor
    except (ImportError, AttributeError):
        return
    if getattr(orig, "_vmambax_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._vmambax_fixed = True
    interpreter._patch_lang_tensor = patched


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

# Overridden by benchmarks/bench_cgm.py's sweep (keys: BLOCK_P, BLOCK_C, rows, programs_per_sm,
# num_warps). Defaults are first guesses, not yet measured on a GPU.
CONFIG_OVERRIDE: dict = {}


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _config(Bt, C, H, W, device):
    o = CONFIG_OVERRIDE
    block_p = o.get("BLOCK_P", 64)
    block_c = o.get("BLOCK_C", max(16, min(32, _pow2(C))))
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        slots = sms * o.get("programs_per_sm", 2)
    else:
        slots = 3  # the interpreter runs programs one by one: few, but more than one tile each
    # Enough bands to give every slot one, but no fewer rows than needed for ~512 pixels a band
    # (a band re-reads its two halo rows in phase 1).
    rows = o.get("rows") or max(1, min(-(-512 // W), (Bt * H) // slots))
    rows = min(rows, H)
    n_bands = -(-H // rows)
    n_tiles = Bt * n_bands
    ring = _pow2(2 * block_p + 2 * W + 2)
    return dict(BLOCK_P=block_p, BLOCK_C=block_c, TH=rows, n_bands=n_bands, n_tiles=n_tiles,
                nprog=min(n_tiles, slots), RING=ring, num_warps=o.get("num_warps", 4))


def _flat(x: torch.Tensor):
    """x with (H, W) addressable as one index p = h*W + w of stride sp: (x, sb, sc, sp). Channels-
    first and channels-last tensors (and expanded gradients) pass as they are; other layouts are
    copied once to contiguous."""
    Bt, C, H, W = x.shape
    if W == 1:
        sp = x.stride(2)
    elif H == 1 or x.stride(2) == W * x.stride(3):
        sp = x.stride(3)
    else:
        x = x.contiguous()
        sp = 1
    return x, x.stride(0), x.stride(1), sp


def _pack_weights(w_ct, w_pet, C):
    """(3, 2C, 32) fp32, three tf32-exact parts of: row c feeds x_ct channel c, row C + c x_pet channel c; column k < 9 is tap k
    of z_ct, column 9 + k tap k of z_pet (w_m acts on cat([X_other, X_m]))."""
    wc = w_ct.reshape(2 * C, 9).float()
    wp = w_pet.reshape(2 * C, 9).float()
    pack = torch.zeros(2 * C, NT, dtype=torch.float32, device=w_ct.device)
    pack[:C, :9], pack[:C, 9:18] = wc[C:], wp[:C]
    pack[C:, :9], pack[C:, 9:18] = wc[:C], wp[C:]
    return torch.stack(_split_host(pack))


def _split_host(a):
    """_split on the host: (3, ...) tf32-exact parts of an fp32 tensor."""
    def trunc(v):
        return (v.view(torch.int32) & -8192).view(torch.float32)
    a0 = trunc(a.contiguous())
    r = a - a0
    a1 = trunc(r)
    return a0, a1, r - a1


def _unpack_weight_grads(dpack, C, w_ct, w_pet):
    dwc = torch.cat([dpack[C:, :9], dpack[:C, :9]]).reshape(w_ct.shape).to(w_ct.dtype)
    dwp = torch.cat([dpack[:C, 9:18], dpack[C:, 9:18]]).reshape(w_pet.shape).to(w_pet.dtype)
    return dwc, dwp


def _forward(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual):
    k = _kernels()
    Bt, C, H, W = x_ct.shape
    cfg = _config(Bt, C, H, W, x_ct.device)
    xa, *sa = _flat(x_ct)
    xb, *sb = _flat(x_pet)
    ya, yb = torch.empty_like(xa), torch.empty_like(xb)
    _, *sya = _flat(ya)
    _, *syb = _flat(yb)
    s = torch.empty((Bt, 2, H, W), dtype=torch.float32, device=x_ct.device)
    ring = torch.empty((cfg["nprog"], NT, cfg["RING"]), dtype=torch.float32, device=x_ct.device)
    k["_cgm_fwd_kernel"][(cfg["nprog"],)](
        xa, xb, ya, yb, s, c_ct.float().contiguous(), c_pet.float().contiguous(),
        _pack_weights(w_ct, w_pet, C), ring,
        C, H, W, cfg["n_bands"], cfg["n_tiles"], cfg["TH"], cfg["RING"], *sa, *sb, *sya, *syb,
        RESIDUAL=residual, X_EXACT=x_ct.dtype != torch.float32, INTERP=_interpreting(),
        BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return ya, yb, s


def _backward(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, residual):
    k = _kernels()
    Bt, C, H, W = x_ct.shape
    cfg = _config(Bt, C, H, W, x_ct.device)
    dev = x_ct.device
    ga, *sga = _flat(g_ct.to(x_ct.dtype))
    gb, *sgb = _flat(g_pet.to(x_pet.dtype))
    xa, *sxa = _flat(x_ct)
    xb, *sxb = _flat(x_pet)
    dxa, dxb = torch.empty_like(xa), torch.empty_like(xb)
    _, *sda = _flat(dxa)
    _, *sdb = _flat(dxb)
    ring = torch.empty((cfg["nprog"], 2, cfg["RING"]), dtype=torch.float32, device=dev)
    dc = torch.zeros((cfg["n_tiles"], 2, C), dtype=torch.float32, device=dev)
    dw = torch.zeros((cfg["nprog"], 2 * C, 18), dtype=torch.float32, device=dev)
    k["_cgm_bwd_kernel"][(cfg["nprog"],)](
        ga, gb, xa, xb, s, c_ct.float().contiguous(), c_pet.float().contiguous(),
        _pack_weights(w_ct, w_pet, C), ring, dxa, dxb, dc, dw,
        C, H, W, cfg["n_bands"], cfg["n_tiles"], cfg["TH"], cfg["RING"],
        *sga, *sgb, *sxa, *sxb, *sda, *sdb,
        RESIDUAL=residual, X_EXACT=x_ct.dtype != torch.float32, INTERP=_interpreting(),
        BLOCK_P=cfg["BLOCK_P"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    dc = dc.view(Bt, cfg["n_bands"], 2, C).sum(1)
    dwc, dwp = _unpack_weight_grads(dw.sum(0), C, w_ct, w_pet)
    return dxa, dxb, dc[:, 0].to(c_ct.dtype, copy=True), dc[:, 1].to(c_pet.dtype, copy=True), dwc, dwp


# ----------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("vmambax::cgm_gate_triton_fwd", mutates_args=())
def _fwd_op(x_ct: torch.Tensor, x_pet: torch.Tensor, c_ct: torch.Tensor, c_pet: torch.Tensor,
            w_ct: torch.Tensor, w_pet: torch.Tensor, residual: bool
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual)


@_fwd_op.register_fake
def _(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual):
    Bt, _, H, W = x_ct.shape
    return (torch.empty_like(x_ct), torch.empty_like(x_pet),
            x_ct.new_empty((Bt, 2, H, W), dtype=torch.float32))


@torch.library.custom_op("vmambax::cgm_gate_triton_bwd", mutates_args=())
def _bwd_op(g_ct: torch.Tensor, g_pet: torch.Tensor, x_ct: torch.Tensor, x_pet: torch.Tensor,
            c_ct: torch.Tensor, c_pet: torch.Tensor, w_ct: torch.Tensor, w_pet: torch.Tensor,
            s: torch.Tensor, residual: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, residual)


@_bwd_op.register_fake
def _(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, residual):
    return (torch.empty_like(x_ct), torch.empty_like(x_pet), torch.empty_like(c_ct),
            torch.empty_like(c_pet), torch.empty_like(w_ct), torch.empty_like(w_pet))


def _setup(ctx, inputs, output):
    x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual = inputs
    ctx.save_for_backward(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, output[2])
    ctx.residual = residual


def _backward_rule(ctx, g_ct, g_pet, _g_s):
    x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s = ctx.saved_tensors
    # torch.library passes zeros for an unused output; None only reaches here if that changes
    g_ct = torch.zeros_like(x_ct) if g_ct is None else g_ct
    g_pet = torch.zeros_like(x_pet) if g_pet is None else g_pet
    grads = _bwd_op(g_ct, g_pet, x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, s, ctx.residual)
    return (*grads, None)


_fwd_op.register_autograd(_backward_rule, setup_context=_setup)


def cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual=True):
    """Backend entry (arguments already validated by the public ``cgm_gate``): (y_ct, y_pet).

    float32/bfloat16/float16 activations run the kernels (math in fp32); float64 runs the
    reference, since the kernels compute in fp32. Differentiable in all six tensors.
    """
    if x_ct.dtype not in _DTYPES:
        return reference.cgm_gate(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, residual)
    y_ct, y_pet, _ = _fwd_op(x_ct, x_pet, c_ct, c_pet, w_ct, w_pet, bool(residual))
    return y_ct, y_pet
