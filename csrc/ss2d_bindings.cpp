// torch.library registration of the fused four-direction 2D selective scan (namespace vmambax).
// Fake (meta) implementations and autograd live in vmambax_kernels/selective_scan/cuda.py.
#include <type_traits>

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "common/checks.h"
#include "selective_scan/ss2d.h"

namespace vmambax {
namespace {

using at::Tensor;
using c10::optional;

template <typename F>
void dispatch_input(at::ScalarType t, const char *name, F &&f) {
  if (t == at::kFloat) f(float(0));
  else if (t == at::kBFloat16) f(__nv_bfloat16());
  else if (t == at::kHalf) f(__half());
  else TORCH_CHECK(false, name, ": expected dtype float32, bfloat16 or float16, got ", t);
}

void check_shape(const Tensor &t, const char *name, c10::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes, name, ": expected shape ", sizes, ", got ", t.sizes());
}

void check_param(const optional<Tensor> &t, const char *name, int64_t K, int64_t Dm) {
  if (!t.has_value()) return;
  VMX_CHECK_CUDA(*t);
  TORCH_CHECK(t->scalar_type() == at::kFloat, name, ": expected dtype float32, got ", t->scalar_type());
  TORCH_CHECK(t->sizes() == c10::IntArrayRef({K, Dm}), name, ": expected shape (", K, ", ", Dm, "), got ", t->sizes());
  TORCH_CHECK(t->is_contiguous(), name, ": expected a contiguous tensor, got strides ", t->strides());
}

// The leading dims of t (all but the last two) as a PlaneMap, when they collapse into (outer, inner).
bool plane_map(const Tensor &t, PlaneMap &m) {
  const int64_t n = t.dim() - 2;
  m = PlaneMap{1, 0, 0};
  if (n <= 0) return true;
  m.inner = t.size(n - 1);
  m.stride_inner = t.stride(n - 1);
  for (int64_t i = n - 2; i >= 1; --i)  // dims 0..n-2 must be one stride apart: outer index
    if (t.size(i) > 1 && t.stride(i - 1) != t.size(i) * t.stride(i)) return false;
  m.stride_outer = n >= 2 ? t.stride(n - 2) : 0;
  return true;
}

// dst (..., W, H) = src (..., H, W) transposed plane by plane (same leading shape and dtype). The
// tiled kernel (ss2d_transpose.cu) when both sides have dense planes whose leading dims collapse and
// the planes are at least a tile wide; else PyTorch's copy (DCIM's 4 x 4 planes: there a tile would
// be mostly idle, and a plane is one or two sectors anyway).
void copy_transposed(const Tensor &src, const Tensor &dst) {
  const int64_t H = src.size(-2), W = src.size(-1), planes = H * W > 0 ? src.numel() / (H * W) : 0;
  PlaneMap ms, md;
  const bool dense = src.stride(-1) == 1 && (H == 1 || src.stride(-2) == W) && dst.stride(-1) == 1 &&
                     (W == 1 || dst.stride(-2) == H);
  if (planes > 0 && H >= 32 && W >= 32 && dense && plane_map(src, ms) && plane_map(dst, md) &&
      src.scalar_type() == dst.scalar_type() && (src.element_size() == 2 || src.element_size() == 4)) {
    ss2d_transpose_launch(src.data_ptr(), dst.data_ptr(), planes, int(H), int(W), ms, md, int(src.element_size()),
                          c10::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    dst.copy_(src.transpose(-2, -1));
  }
}

// A new contiguous (..., W, H) tensor holding t (..., H, W) transposed plane by plane.
Tensor transposed(const Tensor &t) {
  std::vector<int64_t> sizes(t.sizes().begin(), t.sizes().end());
  std::swap(sizes[sizes.size() - 1], sizes[sizes.size() - 2]);
  Tensor out = at::empty(sizes, t.options());
  copy_transposed(t, out);
  return out;
}

// Validates the scan's tensors and fills everything of SS2DParams but the outputs.
SS2DParams make_params(const Tensor &u, const Tensor &dl, const Tensor &A, const Tensor &B, const Tensor &C,
                       const optional<Tensor> &D, const optional<Tensor> &bias, const optional<Tensor> &Wdt,
                       bool softplus, std::vector<Tensor> &keep) {
  VMX_CHECK_CUDA(u);
  TORCH_CHECK(u.dim() == 4, "u: expected a 4-D tensor (Bt, Dm, H, W), got shape ", u.sizes());
  const int64_t Bt = u.size(0), Dm = u.size(1), H = u.size(2), W = u.size(3);
  TORCH_CHECK(Bt >= 1 && Dm >= 1 && H >= 1 && W >= 1, "u: expected every dimension >= 1, got shape ", u.sizes());
  TORCH_CHECK(H * W < (int64_t(1) << 30), "u: expected H*W < 2^30, got H*W = ", H * W);
  VMX_CHECK_CUDA(A);
  VMX_CHECK_DTYPE(A, at::kFloat);
  TORCH_CHECK(A.dim() == 3 && A.size(0) == 4 && A.size(1) == Dm, "A: expected shape (4, ", Dm, ", N), got ", A.sizes());
  VMX_CHECK_CONTIGUOUS(A);
  const int64_t N = A.size(2);
  TORCH_CHECK(N >= 1 && N <= 64, "A: expected a state size N in [1, 64], got N = ", N);
  const int64_t R = Wdt.has_value() ? Wdt->size(2) : 0;
  if (Wdt.has_value()) {
    VMX_CHECK_CUDA(*Wdt);
    VMX_CHECK_DTYPE(*Wdt, at::kFloat);
    TORCH_CHECK(Wdt->dim() == 3 && Wdt->size(0) == 4 && Wdt->size(1) == Dm && R >= 1,
                "dt_projs_weight: expected shape (4, ", Dm, ", R) with R >= 1, got ", Wdt->sizes());
    VMX_CHECK_CONTIGUOUS(*Wdt);
    check_shape(dl, "dt", {Bt, 4, R, H, W});
  } else {
    check_shape(dl, "delta", {Bt, 4, Dm, H, W});
  }
  check_shape(B, "B", {Bt, 4, N, H, W});
  check_shape(C, "C", {Bt, 4, N, H, W});
  auto same_as_u = [&](const Tensor &t, const char *name) {
    TORCH_CHECK(t.device() == u.device(), name, ": expected a tensor on ", u.device(), ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == u.scalar_type(), name, ": expected dtype ", u.scalar_type(),
                " (the dtype of u), got ", t.scalar_type());
  };
  same_as_u(dl, Wdt.has_value() ? "dt" : "delta");
  same_as_u(B, "B");
  same_as_u(C, "C");
  VMX_CHECK_PLANE(u);
  VMX_CHECK_PLANE(B);
  VMX_CHECK_PLANE(C);
  TORCH_CHECK(dl.stride(-1) == 1 && (H == 1 || dl.stride(-2) == W), Wdt.has_value() ? "dt" : "delta",
              ": expected a dense H*W plane (strides (W, 1) on the last two dims), got strides ", dl.strides());
  check_param(D, "D", 4, Dm);
  check_param(bias, "delta_bias", 4, Dm);

  SS2DParams p{};
  p.Bt = int(Bt); p.Dm = int(Dm); p.H = int(H); p.W = int(W); p.L = int(H * W); p.N = int(N); p.R = int(R);
  p.softplus = softplus;
  p.T = kChunk;
  p.nc = ss2d_chunks(p.L);
  p.nth = ss2d_threads(p.Dm);
  TORCH_CHECK(int64_t(p.nc) * 2 * Bt < (int64_t(1) << 31), "u: expected Bt * ceil(H*W / ", kChunk,
              ") * 2 < 2^31 (grid size), got Bt = ", Bt, ", H*W = ", p.L);
  auto smem_of = [&](int nth) { return std::max(ss2d_fwd_smem(p.N, p.R, nth), ss2d_bwd_smem(p.N, p.R, nth)); };
  while (p.nth > 32 && smem_of(p.nth) > 227 * 1024) p.nth -= 32;  // large N: fewer channels per block
  const size_t smem = smem_of(p.nth);
  TORCH_CHECK(smem <= 227 * 1024, "dt_projs_weight: the kernels stage R = ", R, " rows of dt and N = ", N,
              " states per block in shared memory: ", smem, " bytes, over 227 KB");
  // Row walks read the tensors as given (k = 0, 2: k >> 1 steps two k's); column walks read
  // copies of u and of the k = 1, 3 slices transposed to (W, H) planes, so both walk memory order.
  auto odd_t = [](const Tensor &t) { return transposed(t.slice(1, 1, 4, 2)); };
  keep.push_back(transposed(u));
  keep.push_back(odd_t(dl));
  keep.push_back(odd_t(B));
  keep.push_back(odd_t(C));
  const Tensor *src[2][4] = {{&u, &dl, &B, &C}, {&keep[0], &keep[1], &keep[2], &keep[3]}};
  for (int side = 0; side < 2; ++side) {
    SS2DSide &sd = p.sides[side];
    const Tensor &tu = *src[side][0], &tdl = *src[side][1], &tB = *src[side][2], &tC = *src[side][3];
    const int64_t kmul = side == 0 ? 2 : 1;
    sd.u = tu.data_ptr(); sd.dl = tdl.data_ptr(); sd.B = tB.data_ptr(); sd.C = tC.data_ptr();
    sd.u_b = tu.stride(0); sd.u_d = tu.stride(1);
    sd.dl_b = tdl.stride(0); sd.dl_k = kmul * tdl.stride(1); sd.dl_c = tdl.stride(2);
    sd.B_b = tB.stride(0); sd.B_k = kmul * tB.stride(1); sd.B_n = tB.stride(2);
    sd.C_b = tC.stride(0); sd.C_k = kmul * tC.stride(1); sd.C_n = tC.stride(2);
  }
  p.A = A.data_ptr<float>();
  p.D = D.has_value() ? D->data_ptr<float>() : nullptr;
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.Wdt = Wdt.has_value() ? Wdt->data_ptr<float>() : nullptr;
  return p;
}

// The forward returns (out, states): states = the fp32 state entering each chunk of every walk,
// (Bt, 4, nc, N, Dm) with nc = ceil(H*W / T) (size 0 along nc when a walk is one chunk), when
// save_states; else an empty (0,) tensor.
std::tuple<Tensor, Tensor> fwd_impl(const Tensor &u, const Tensor &dl, const Tensor &A, const Tensor &B,
                                    const Tensor &C, const optional<Tensor> &D, const optional<Tensor> &bias,
                                    const optional<Tensor> &Wdt, bool softplus, at::ScalarType out_dtype,
                                    bool save_states) {
  c10::cuda::CUDAGuard guard(u.device());
  std::vector<Tensor> keep;
  SS2DParams p = make_params(u, dl, A, B, C, D, bias, Wdt, softplus, keep);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "out_dtype: expected float32, bfloat16 or float16, got ", out_dtype);
  auto f32 = u.options().dtype(at::kFloat);
  Tensor out = at::empty({p.Bt, p.Dm, p.H, p.W}, u.options().dtype(out_dtype));
  Tensor acc = out_dtype == at::kFloat ? out : at::empty({p.Bt, p.Dm, p.H, p.W}, f32);
  // The column walks' sum in their own (W, H) planes, merged into out by the last kernel; freed on
  // return (100.7 MB at enc1: Bt 8, Dm 192, 128 x 128). See ss2d_fwd_kernel.cuh, pass 3.
  Tensor accT = at::empty({p.Bt, p.Dm, p.W, p.H}, f32);
  Tensor cS, cE;
  if (p.nc > 1) {
    cS = at::empty({p.Bt, 4, p.nc, p.Dm}, f32);
    cE = at::empty({p.Bt, 4, p.nc, p.N, p.Dm}, f32);
    p.cS = cS.data_ptr<float>();
    p.cE = cE.data_ptr<float>();
  }
  p.acc = acc.data_ptr<float>();
  p.accT = accT.data_ptr<float>();
  p.out = out.data_ptr();
  p.out_type = out_dtype == at::kFloat ? OutType::kFloat : out_dtype == at::kBFloat16 ? OutType::kBFloat16 : OutType::kHalf;
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_input(u.scalar_type(), "u", [&](auto x) { ss2d_fwd_launch<decltype(x)>(p, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  Tensor states = !save_states ? at::empty({0}, f32) : p.nc > 1 ? cE : at::empty({p.Bt, 4, 0, p.N, p.Dm}, f32);
  return {out, states};
}

std::tuple<Tensor, Tensor> ss2d_fwd(const Tensor &u, const Tensor &delta, const Tensor &A, const Tensor &B,
                                    const Tensor &C, const optional<Tensor> &D, const optional<Tensor> &bias,
                                    bool softplus, at::ScalarType out_dtype, bool save_states) {
  return fwd_impl(u, delta, A, B, C, D, bias, c10::nullopt, softplus, out_dtype, save_states);
}

std::tuple<Tensor, Tensor> ss2d_lowrank_fwd(const Tensor &u, const Tensor &dt, const Tensor &A, const Tensor &B,
                                            const Tensor &C, const optional<Tensor> &D, const optional<Tensor> &bias,
                                            const Tensor &Wdt, bool softplus, at::ScalarType out_dtype,
                                            bool save_states) {
  return fwd_impl(u, dt, A, B, C, D, bias, Wdt, softplus, out_dtype, save_states);
}

// Gradients in fp32 (the Python side casts them to each input's dtype); absent D / delta_bias /
// dt_projs_weight give empty tensors. The cross-block sums are accumulated in float64 where the
// kernels say so (dA, dD, dbias, dW always; dB, dC, low-rank ddt for fp32 inputs: SS2DAcc in
// ss2d.h) and rounded to fp32 here, once.
std::vector<Tensor> ss2d_bwd(const Tensor &dy, const Tensor &u, const Tensor &dl, const Tensor &A, const Tensor &B,
                             const Tensor &C, const optional<Tensor> &D, const optional<Tensor> &bias,
                             const optional<Tensor> &Wdt, const Tensor &states, bool softplus) {
  c10::cuda::CUDAGuard guard(u.device());
  std::vector<Tensor> keep;
  SS2DParams p = make_params(u, dl, A, B, C, D, bias, Wdt, softplus, keep);
  VMX_CHECK_CUDA(dy);
  VMX_CHECK_DTYPE(dy, at::kFloat);
  VMX_CHECK_SHAPE(dy, p.Bt, p.Dm, p.H, p.W);
  VMX_CHECK_CONTIGUOUS(dy);
  VMX_CHECK_CUDA(states);
  VMX_CHECK_DTYPE(states, at::kFloat);
  VMX_CHECK_SHAPE(states, p.Bt, 4, p.nc > 1 ? p.nc : 0, p.N, p.Dm);
  VMX_CHECK_CONTIGUOUS(states);
  auto f32 = u.options().dtype(at::kFloat);
  const int64_t Bt = p.Bt, Dm = p.Dm, H = p.H, W = p.W, N = p.N, R = p.R, L = p.L, Cl = R > 0 ? R : Dm;
  Tensor du = at::empty({Bt, Dm, H, W}, f32);
  Tensor duT = at::empty({Bt, Dm, W, H}, f32);  // the column walks' du (ss2d.h: SS2DParams::duT)
  // Column walks read dy in their transposed layout (coalesced along their walk).
  Tensor dyT = transposed(dy);
  // Channel sums (dB, dC, low-rank ddt) are accumulated with atomics: zeros, of the kernels'
  // accumulator type (float64 for fp32 inputs, else fp32). The full-rank ddelta is written once per
  // element by its owner: fp32. Column walks write transposed slices, copied back below.
  at::ScalarType acc_type = at::kFloat;
  dispatch_input(u.scalar_type(), "u", [&](auto x) {
    acc_type = std::is_same<typename SS2DAcc<decltype(x)>::type, double>::value ? at::kDouble : at::kFloat;
  });
  auto fa = u.options().dtype(acc_type);
  Tensor ddl = R > 0 ? at::zeros({Bt, 4, R, H, W}, fa) : at::empty({Bt, 4, Dm, H, W}, f32);
  Tensor ddlT = R > 0 ? at::zeros({Bt, 2, R, W, H}, fa) : at::empty({Bt, 2, Dm, W, H}, f32);
  Tensor dB = at::zeros({Bt, 4, N, H, W}, fa), dC = at::zeros({Bt, 4, N, H, W}, fa);
  Tensor dBT = at::zeros({Bt, 2, N, W, H}, fa), dCT = at::zeros({Bt, 2, N, W, H}, fa);
  auto f64 = u.options().dtype(at::kDouble);  // parameter sums: see SS2DParams::dA
  Tensor dA = at::zeros({4, Dm, N}, f64);
  Tensor dD = D.has_value() ? at::zeros({4, Dm}, f64) : at::empty({0}, f32);
  Tensor dbias = bias.has_value() ? at::zeros({4, Dm}, f64) : at::empty({0}, f32);
  Tensor dW = Wdt.has_value() ? at::zeros({4, Dm, R}, f64) : at::empty({0}, f32);
  Tensor *g[2][3] = {{&ddl, &dB, &dC}, {&ddlT, &dBT, &dCT}};
  for (int side = 0; side < 2; ++side) {
    SS2DSide &sd = p.sides[side];
    sd.dy = (side == 0 ? dy : dyT).data_ptr<float>();
    const int64_t kw = side == 0 ? 4 : 2;  // k's in the buffer; row side steps two of them
    // float or float64 buffers (acc_type) behind SS2DSide's float pointers: see ss2d.h:SS2DSide
    auto ptr = [](const Tensor *t) { return static_cast<float *>(t->data_ptr()); };
    sd.ddl = ptr(g[side][0]); sd.dB = ptr(g[side][1]); sd.dC = ptr(g[side][2]);
    sd.ddl_b = kw * Cl * L; sd.ddl_k = (side == 0 ? 2 : 1) * Cl * L;
    sd.g_b = kw * N * L; sd.g_k = (side == 0 ? 2 : 1) * N * L;
  }
  Tensor cS, cQ;
  if (p.nc > 1) {
    cS = at::empty({Bt, 4, p.nc, Dm}, f32);
    cQ = at::empty({Bt, 4, p.nc, N, Dm}, f32);
    p.cS = cS.data_ptr<float>();
    p.cQ = cQ.data_ptr<float>();
    p.cE = states.data_ptr<float>();
  }
  p.du = du.data_ptr<float>();
  p.duT = duT.data_ptr<float>();
  p.dA = dA.data_ptr<double>();
  p.dD = D.has_value() ? dD.data_ptr<double>() : nullptr;
  p.dbias = bias.has_value() ? dbias.data_ptr<double>() : nullptr;
  p.dW = Wdt.has_value() ? dW.data_ptr<double>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  dispatch_input(u.scalar_type(), "u", [&](auto x) { ss2d_bwd_launch<decltype(x)>(p, stream); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Float64 sums are rounded to fp32 first (each element once), so the column walks' slices go
  // through the tiled transpose in fp32 (it takes 2- and 4-byte elements); no-ops for fp32 buffers.
  auto rounded = [](const Tensor &t) { return t.to(at::kFloat); };
  ddl = rounded(ddl);
  dB = rounded(dB);
  dC = rounded(dC);
  copy_transposed(rounded(ddlT), ddl.slice(1, 1, 4, 2));
  copy_transposed(rounded(dBT), dB.slice(1, 1, 4, 2));
  copy_transposed(rounded(dCT), dC.slice(1, 1, 4, 2));
  return {du, ddl, rounded(dA), dB, dC, rounded(dD), rounded(dbias), rounded(dW)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vmambax, m) {
  m.def("ss2d_cuda_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, "
        "bool delta_softplus, ScalarType out_dtype, bool save_states) -> (Tensor, Tensor)");
  m.def("ss2d_lowrank_cuda_fwd(Tensor u, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? delta_bias, "
        "Tensor dt_projs_weight, bool delta_softplus, ScalarType out_dtype, bool save_states) -> (Tensor, Tensor)");
  m.def("ss2d_cuda_bwd(Tensor dy, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
        "Tensor? delta_bias, Tensor? dt_projs_weight, Tensor states, bool delta_softplus) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(vmambax, CUDA, m) {
  m.impl("ss2d_cuda_fwd", &ss2d_fwd);
  m.impl("ss2d_lowrank_cuda_fwd", &ss2d_lowrank_fwd);
  m.impl("ss2d_cuda_bwd", &ss2d_bwd);
}

}  // namespace vmambax

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "vmambax CUDA kernels: ops live in torch.ops.vmambax"; }
