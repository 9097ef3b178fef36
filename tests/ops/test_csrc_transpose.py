"""CI on CPU: a transcription of the CUDA op's plane transpose (csrc/ss2d_bindings.cpp plane_map /
copy_transposed, csrc/selective_scan/ss2d_transpose.cu) checked against torch's transpose on the
views the op hands it: u with free outer strides, the k = 1, 3 slices of (Bt, 4, K, H, W) tensors,
and the backward's copies back into those slices. (nvcc compiling the kernel is test_csrc_compile's.)"""
import pytest
import torch

TILE, ROWS = 32, 8  # kTrTile, kTrRows


def plane_map(t):
    """(inner, stride_outer, stride_inner), or None when the leading dims do not collapse."""
    n = t.dim() - 2
    if n <= 0:
        return 1, 0, 0
    for i in range(n - 2, 0, -1):
        if t.size(i) > 1 and t.stride(i - 1) != t.size(i) * t.stride(i):
            return None
    return t.size(n - 1), (t.stride(n - 2) if n >= 2 else 0), t.stride(n - 1)


def uses_kernel(src, dst):
    H, W = src.shape[-2:]
    dense = (src.stride(-1) == 1 and (H == 1 or src.stride(-2) == W) and dst.stride(-1) == 1
             and (W == 1 or dst.stride(-2) == H))
    return (src.numel() > 0 and H >= 32 and W >= 32 and dense and plane_map(src) is not None
            and plane_map(dst) is not None and src.dtype == dst.dtype)


def kernel(src, dst, grid_z):
    """The kernel on flat storage: blocks (x: W tiles, y: H tiles, z: planes, strided), threads 32 x 8."""
    H, W = src.shape[-2:]
    planes = src.numel() // (H * W)
    (mi, mo, mn), (di, do, dn) = plane_map(src), plane_map(dst)
    s_flat = src.as_strided((src.untyped_storage().nbytes() // src.element_size(),), (1,), 0)
    d_flat = dst.as_strided((dst.untyped_storage().nbytes() // dst.element_size(),), (1,), 0)
    s0, d0 = src.storage_offset(), dst.storage_offset()
    for bx in range(-(-W // TILE)):
        for by in range(-(-H // TILE)):
            for bz in range(grid_z):
                for p in range(bz, planes, grid_z):
                    so = s0 + (p // mi) * mo + (p % mi) * mn
                    do_ = d0 + (p // di) * do + (p % di) * dn
                    tile = {}
                    for ty in range(ROWS):
                        for tx in range(TILE):
                            for j in range(ty, TILE, ROWS):
                                h, w = by * TILE + j, bx * TILE + tx
                                if h < H and w < W:
                                    tile[j, tx] = s_flat[so + h * W + w].item()
                    for ty in range(ROWS):
                        for tx in range(TILE):
                            for j in range(ty, TILE, ROWS):
                                w, h = bx * TILE + j, by * TILE + tx
                                if w < W and h < H:
                                    d_flat[do_ + w * H + h] = tile[tx, j]


def copy_transposed(src, dst, grid_z=3):
    if uses_kernel(src, dst):
        kernel(src, dst, grid_z)
    else:
        dst.copy_(src.transpose(-2, -1))


def transposed(t):
    out = torch.empty((*t.shape[:-2], t.shape[-1], t.shape[-2]), dtype=t.dtype)
    copy_transposed(t, out)
    return out


def test_u_with_free_outer_strides():
    base = torch.randn(2, 5, 33, 40)
    u = base[:, 1:4]                      # channels sliced: outer strides not those of a contiguous tensor
    assert uses_kernel(u, torch.empty(2, 3, 40, 33))
    torch.testing.assert_close(transposed(u), u.transpose(2, 3).contiguous(), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(2, 4, 3, 33, 40), (1, 4, 2, 64, 33)])
def test_odd_walk_slices_and_copies_back(shape):
    t = torch.randn(*shape, dtype=torch.bfloat16)
    odd = t[:, 1::2]                     # C++: t.slice(1, 1, 4, 2)
    assert uses_kernel(odd, torch.empty(*odd.shape[:-2], shape[-1], shape[-2], dtype=t.dtype))
    tT = transposed(odd)
    torch.testing.assert_close(tT, odd.transpose(3, 4).contiguous(), rtol=0, atol=0)
    back = torch.zeros(shape, dtype=torch.bfloat16)
    copy_transposed(tT, back[:, 1::2])   # the backward's copy into the k = 1, 3 slices
    torch.testing.assert_close(back[:, 1::2], odd, rtol=0, atol=0)
    assert back[:, 0::2].float().abs().sum() == 0   # k = 0, 2 untouched


def test_small_or_strided_planes_take_the_generic_copy():
    assert not uses_kernel(torch.randn(3, 4, 4), torch.empty(3, 4, 4))          # DCIM's 4 x 4 planes
    assert not uses_kernel(torch.randn(2, 40, 64)[:, :, ::2], torch.empty(2, 32, 40))  # strided plane
    t = torch.randn(3, 4, 2, 40, 36).permute(1, 0, 2, 3, 4)                       # leading dims out of order
    assert plane_map(t) is None
    torch.testing.assert_close(transposed(t), t.transpose(-2, -1).contiguous(), rtol=0, atol=0)
