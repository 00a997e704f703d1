// Fused element-wise ops of the Llama forward (issue #12): residual add + RMSNorm, SiLU(gate) * up,
// and RoPE on q and k in place. One pass over each row instead of torch's 5-8 separate
// kernels (each a read and a write of the whole activation), rows in parallel over torch's
// intra-op threads. Every op rounds where pdserve/model/llama.py's torch form rounds, so:
//
//   * rms_norm: the sum of squares is added in exactly the order of torch's CPU sum
//     (aten/src/ATen/native/cpu/SumKernel.cpp: `lanes`-wide vector accumulators, 4-way ILP,
//     cascaded levels, scalar tail first, then the lanes), then / n, + eps, 1 / sqrt: the
//     output is bitwise F.rms_norm's (fp32) and transformers' (bf16: normalized in fp32,
//     rounded to bf16, times the weight in bf16), for `lanes` = the width torch's kernels use
//     on this CPU (16 with AVX-512, 8 with AVX2).
//   * silu_mul: x / (1 + exp(-x)) with the same exp torch's vectorized SiLU uses (SLEEF's
//     expf16_u10, exported by libtorch_cpu) where AVX-512 is compiled in; with AVX2 + FMA only
//     (e.g. AMD Zen 3), SLEEF's expf8_u10 over whole 16-element steps and libm's exp over the
//     rest, torch's own split there, so float32 is bitwise F.silu(g) * u for every width; bf16
//     rounds the SiLU to bf16 before the product, as `F.silu(g) * u` does.
//   * with --quantization w8a8_int8, rms_norm and silu_mul also write their output's int8 rows
//     and scales (linears.int8_linear's per-row quantization) while the row is in cache.
//   * int8_dequant: int8_linear's `(acc.float() * x_scale * w_scale).to(dtype)`, same order.
//   * rope_qk: apply_rope's two products and one add per element, each rounded (fp-contract
//     is off below, so no fused multiply-add changes a bit).
//
// Registered in torch.ops.pdserve_cpu next to paged_decode (paged_attention.cpp).

#pragma GCC optimize("fp-contract=off")

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define PDSERVE_AVX512 1
#include <immintrin.h>
extern "C" __m512 Sleef_expf16_u10(__m512);
#elif defined(__AVX2__) && defined(__FMA__)
// AVX2 machines (e.g. AMD Zen 3): SLEEF's 8-lane exp, the one torch's AVX2 Vectorized<float>::exp
// calls (exported by libtorch_cpu), so silu_mul rounds exactly as F.silu does there.
#define PDSERVE_AVX2 1
#include <immintrin.h>
extern "C" __m256 Sleef_expf8_u10(__m256);
#endif

namespace {

using bf16 = c10::BFloat16;

inline float to_f(float x) { return x; }
inline float to_f(bf16 x) { return static_cast<float>(x); }
template <typename T>
inline T from_f(float x);
template <>
inline float from_f<float>(float x) { return x; }
template <>
inline bf16 from_f<bf16>(float x) { return bf16(x); }  // round to nearest even, as torch

inline int64_t ceil_log2(int64_t x) {  // at::native::utils::CeilLog2
  if (x <= 2) return 1;
  return 64 - __builtin_clzll(static_cast<uint64_t>(x - 1));
}

// sum(x[0:n]) added in the order of torch's vectorized inner sum for W-lane vectors.
template <int W>
float torch_order_sum(const float* x, int64_t n) {
  const int64_t nv = n / W;    // whole vectors
  const int64_t rows = nv / 4;  // groups of 4 vectors (4 independent partial sums)
  float acc[4][4][W];           // [level][partial][lane]
  std::memset(acc, 0, sizeof(acc));
  const int64_t lp = std::max<int64_t>(4, ceil_log2(rows) / 4);
  const int64_t step = int64_t(1) << lp, mask = step - 1;
  auto add_group = [&](int64_t r) {
    const float* p = x + r * 4 * W;
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += p[k * W + l];
  };
  int64_t i = 0;
  while (i + step <= rows) {
    for (int64_t j = 0; j < step; ++j, ++i) add_group(i);
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.f;
        }
      if ((i & (mask << (j * lp))) != 0) break;
    }
  }
  for (; i < rows; ++i) add_group(i);
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t v = rows * 4; v < nv; ++v)
    for (int l = 0; l < W; ++l) acc[0][0][l] += x[v * W + l];
  for (int k = 1; k < 4; ++k)
    for (int l = 0; l < W; ++l) acc[0][0][l] += acc[0][k][l];
  float total = 0.f;
  for (int64_t e = nv * W; e < n; ++e) total += x[e];
  for (int l = 0; l < W; ++l) total += acc[0][0][l];
  return total;
}

float ordered_sum(const float* x, int64_t n, int64_t lanes) {
  switch (lanes) {
    case 16: return torch_order_sum<16>(x, n);
    case 8: return torch_order_sum<8>(x, n);
    case 4: return torch_order_sum<4>(x, n);
    default: return torch_order_sum<1>(x, n);
  }
}

#ifdef PDSERVE_AVX512
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline __m256i to_bf16_bits(__m512 v) {  // round to nearest even; NaN -> 0x7fc0, as c10::BFloat16
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 ord = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  r = _mm512_mask_blend_epi32(ord, _mm512_set1_epi32(0x7fc0), r);
  return _mm512_cvtepi32_epi16(r);
}
inline void store16(bf16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16_bits(v)); }
inline __m512 round_like(__m512 v, float) { return v; }
inline __m512 round_like(__m512 v, bf16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(v)), 16));
}
#endif

#ifdef PDSERVE_AVX2
// 8 lanes of float32 or bfloat16 (widened to float32) at p; stores round to the element type.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline __m128i to_bf16_bits8(__m256 v) {  // round to nearest even; NaN -> 0x7fc0, as c10::BFloat16
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i ord = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q));
  r = _mm256_blendv_epi8(_mm256_set1_epi32(0x7fc0), r, ord);
  // pack the 8 32-bit values (each < 2^16) to 16 bits: packus works per 128-bit half
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(bf16* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_bits8(v)); }
inline __m256 round_like8(__m256 v, float) { return v; }
inline __m256 round_like8(__m256 v, bf16) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(to_bf16_bits8(v)), 16));
}
#endif

// --quantization w8a8_int8: the row's int8 activations and scale, as linears.int8_linear computes
// them from the op's output (scale = max(amax|x| / 127, 1e-12), q = round-half-even(x / scale)).
template <typename T>
void quant_row(const T* x, int64_t n, int8_t* q, float* scale) {
#ifdef PDSERVE_AVX512
  __m512 vmax = _mm512_setzero_ps();
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 m = n - e >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - e)) - 1);
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(x + e, m)));  // masked-off lanes load 0
  }
  const float sc = std::max(_mm512_reduce_max_ps(vmax) / 127.f, 1e-12f);
  const __m512 vsc = _mm512_set1_ps(sc);
  for (int64_t e = 0; e < n; e += 16) {
    const __mmask16 m = n - e >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - e)) - 1);
    const __m512 r = _mm512_roundscale_ps(_mm512_div_ps(load16(x + e, m), vsc), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_mask_storeu_epi8(q + e, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r)));
  }
  *scale = sc;
#else
  float amax = 0.f;
  for (int64_t e = 0; e < n; ++e) amax = std::max(amax, std::fabs(to_f(x[e])));
  const float sc = std::max(amax / 127.f, 1e-12f);
  for (int64_t e = 0; e < n; ++e) q[e] = static_cast<int8_t>(std::nearbyint(to_f(x[e]) / sc));
  *scale = sc;
#endif
}

struct Quant {  // optional int8 outputs of an op: q [rows, n] int8, scale [rows, 1] float32
  int8_t* q = nullptr;
  float* scale = nullptr;
  int64_t qs = 0, ss = 0;
};

Quant quant_outputs(const c10::optional<at::Tensor>& q, const c10::optional<at::Tensor>& scale,
                    const at::Tensor& like, const char* op) {
  Quant r;
  TORCH_CHECK(q.has_value() == scale.has_value(), op, ": q and scale go together");
  if (!q.has_value()) return r;
  TORCH_CHECK(q->scalar_type() == at::kChar && q->sizes() == like.sizes() && q->stride(1) == 1, op,
              ": q must be int8 shaped like the output, rows contiguous");
  TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 2 && scale->size(0) == like.size(0) &&
                  scale->size(1) == 1,
              op, ": scale must be float32 [rows, 1]");
  r.q = q->data_ptr<int8_t>();
  r.scale = scale->data_ptr<float>();
  r.qs = q->stride(0);
  r.ss = scale->stride(0);
  return r;
}

// ---- residual add + RMSNorm --------------------------------------------------------------

// An op's input rows (rms_norm's residual, silu_mul's [gate | up]): rows of the model dtype, or
// (--quantization w8a8_int8) an int8 linear's int32 sums and scales, dequantized on the fly
// exactly as int8_dequant rounds them, so the linear's output is never written out and read back.
// `at` reads one element as float, `load` 16 of them (masked).
template <typename T>
struct DenseRows {
  const T* p;
  int64_t stride;
  float at(int64_t r, int64_t e) const { return to_f(p[r * stride + e]); }
#ifdef PDSERVE_AVX512
  __m512 load(int64_t r, int64_t e, __mmask16 m) const { return load16(p + r * stride + e, m); }
#endif
#ifdef PDSERVE_AVX2
  __m256 load8(int64_t r, int64_t e) const { return ::load8(p + r * stride + e); }
#endif
};
template <typename T>
struct Int32Rows {
  const int32_t* p;
  int64_t stride;
  const float* xs;
  int64_t xss;
  const float* ws;
  float at(int64_t r, int64_t e) const {
    return to_f(from_f<T>((static_cast<float>(p[r * stride + e]) * xs[r * xss]) * ws[e]));
  }
#ifdef PDSERVE_AVX512
  __m512 load(int64_t r, int64_t e, __mmask16 m) const {
    const __m512 a = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, p + r * stride + e));
    return round_like(_mm512_mul_ps(_mm512_mul_ps(a, _mm512_set1_ps(xs[r * xss])), _mm512_maskz_loadu_ps(m, ws + e)),
                      T());
  }
#endif
#ifdef PDSERVE_AVX2
  __m256 load8(int64_t r, int64_t e) const {
    const __m256 a = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + r * stride + e)));
    return round_like8(_mm256_mul_ps(_mm256_mul_ps(a, _mm256_set1_ps(xs[r * xss])), _mm256_loadu_ps(ws + e)), T());
  }
#endif
};

template <typename T, typename Res>
void rms_norm_impl(at::Tensor& h, const Res* res, const at::Tensor& w, double eps, int64_t lanes, at::Tensor& out,
                   const Quant& qo) {
  const int64_t R = h.size(0), n = h.size(1);
  T* hp = h.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t hs = h.stride(0), os = out.stride(0);
  const float epsf = static_cast<float>(eps), nf = static_cast<float>(n);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(n), sq(n);
    for (int64_t r = begin; r < end; ++r) {
      T* hr = hp + r * hs;
      if (res != nullptr) {  // h += residual, rounded to T, kept in h
        for (int64_t e = 0; e < n; ++e) {
          const T v = from_f<T>(to_f(hr[e]) + res->at(r, e));
          hr[e] = v;
          xf[e] = to_f(v);
        }
      } else {
        for (int64_t e = 0; e < n; ++e) xf[e] = to_f(hr[e]);
      }
      for (int64_t e = 0; e < n; ++e) sq[e] = xf[e] * xf[e];
      const float var = ordered_sum(sq.data(), n, lanes) / nf;
      const float inv = 1.f / std::sqrt(var + epsf);
      T* orow = op + r * os;
      if constexpr (std::is_same_v<T, float>) {
        for (int64_t e = 0; e < n; ++e) orow[e] = (xf[e] * inv) * wp[e];
      } else {  // normalized, rounded to bf16, then times the weight in bf16
        for (int64_t e = 0; e < n; ++e) orow[e] = from_f<T>(to_f(from_f<T>(xf[e] * inv)) * to_f(wp[e]));
      }
      if (qo.q != nullptr) quant_row(orow, n, qo.q + r * qo.qs, qo.scale + r * qo.ss);
    }
  });
}

void rms_norm(at::Tensor h, const c10::optional<at::Tensor>& residual, const at::Tensor& w, double eps,
              int64_t lanes, at::Tensor out, const c10::optional<at::Tensor>& q,
              const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(h.dim() == 2 && out.dim() == 2 && w.dim() == 1, "rms_norm: h and out [rows, n], w [n]");
  TORCH_CHECK(h.stride(1) == 1 && out.stride(1) == 1 && w.is_contiguous(), "rms_norm: rows must be contiguous");
  TORCH_CHECK(out.sizes() == h.sizes() && w.size(0) == h.size(1), "rms_norm: shapes differ");
  TORCH_CHECK(h.scalar_type() == w.scalar_type() && out.scalar_type() == h.scalar_type(),
              "rms_norm: h, w and out must share a dtype");
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == h.sizes() && residual->stride(1) == 1 &&
                    residual->scalar_type() == h.scalar_type(),
                "rms_norm: residual must be shaped and typed like h");
  }
  const Quant qo = quant_outputs(q, scale, out, "rms_norm");
  if (h.scalar_type() == at::kFloat) {
    const DenseRows<float> r{residual.has_value() ? residual->data_ptr<float>() : nullptr,
                             residual.has_value() ? residual->stride(0) : 0};
    rms_norm_impl<float>(h, residual.has_value() ? &r : nullptr, w, eps, lanes, out, qo);
  } else if (h.scalar_type() == at::kBFloat16) {
    const DenseRows<bf16> r{residual.has_value() ? residual->data_ptr<bf16>() : nullptr,
                            residual.has_value() ? residual->stride(0) : 0};
    rms_norm_impl<bf16>(h, residual.has_value() ? &r : nullptr, w, eps, lanes, out, qo);
  } else {
    TORCH_CHECK(false, "rms_norm: float32 or bfloat16 only");
  }
}

void check_int8_sums(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale, int64_t rows,
                     int64_t n, const char* op) {
  TORCH_CHECK(acc.dim() == 2 && acc.scalar_type() == at::kInt && acc.stride(1) == 1 && acc.size(0) >= rows &&
                  acc.size(1) == n,
              op, ": acc int32 [>= rows, N], rows contiguous");
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.dim() == 2 && x_scale.size(0) == rows &&
                  x_scale.size(1) == 1,
              op, ": x_scale float32 [rows, 1]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == n, op,
              ": w_scale float32 [N]");
}

// rms_norm with the residual given as an int8 linear's int32 sums (acc [>= rows, n]) and its
// row and column scales: `h += (acc.float() * x_scale * w_scale).to(dtype)`, then RMSNorm.
void rms_norm_i32(at::Tensor h, const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale,
                  const at::Tensor& w, double eps, int64_t lanes, at::Tensor out, const c10::optional<at::Tensor>& q,
                  const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(h.dim() == 2 && out.dim() == 2 && w.dim() == 1, "rms_norm_i32: h and out [rows, n], w [n]");
  TORCH_CHECK(h.stride(1) == 1 && out.stride(1) == 1 && w.is_contiguous(), "rms_norm_i32: rows must be contiguous");
  TORCH_CHECK(out.sizes() == h.sizes() && w.size(0) == h.size(1), "rms_norm_i32: shapes differ");
  TORCH_CHECK(h.scalar_type() == w.scalar_type() && out.scalar_type() == h.scalar_type(),
              "rms_norm_i32: h, w and out must share a dtype");
  check_int8_sums(acc, x_scale, w_scale, h.size(0), h.size(1), "rms_norm_i32");
  const Quant qo = quant_outputs(q, scale, out, "rms_norm_i32");
  if (h.scalar_type() == at::kFloat) {
    const Int32Rows<float> r{acc.data_ptr<int32_t>(), acc.stride(0), x_scale.data_ptr<float>(), x_scale.stride(0),
                             w_scale.data_ptr<float>()};
    rms_norm_impl<float>(h, &r, w, eps, lanes, out, qo);
  } else if (h.scalar_type() == at::kBFloat16) {
    const Int32Rows<bf16> r{acc.data_ptr<int32_t>(), acc.stride(0), x_scale.data_ptr<float>(), x_scale.stride(0),
                            w_scale.data_ptr<float>()};
    rms_norm_impl<bf16>(h, &r, w, eps, lanes, out, qo);
  } else {
    TORCH_CHECK(false, "rms_norm_i32: float32 or bfloat16 only");
  }
}

// int8 rows and scales of x (linears.int8_linear's quantization of its input), for inputs no other
// fused op produces (the attention output before o_proj).
void int8_quant(const at::Tensor& x, at::Tensor q, at::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "int8_quant: x [rows, n], rows contiguous");
  const Quant qo = quant_outputs(q, scale, x, "int8_quant");
  const int64_t R = x.size(0), n = x.size(1), xs = x.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  auto run = [&](auto* xp) {
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) quant_row(xp + r * xs, n, qo.q + r * qo.qs, qo.scale + r * qo.ss);
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(x.data_ptr<float>());
  } else if (x.scalar_type() == at::kBFloat16) {
    run(x.data_ptr<bf16>());
  } else {
    TORCH_CHECK(false, "int8_quant: float32 or bfloat16 only");
  }
}

// ---- SiLU(gate) * up ---------------------------------------------------------------------


template <typename T, typename Src>
void silu_mul_impl(const Src& src, at::Tensor& out, const Quant& qo) {
  const int64_t R = out.size(0), I = out.size(1);
  T* op = out.data_ptr<T>();
  const int64_t os = out.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* o = op + r * os;
#ifdef PDSERVE_AVX512
      const __m512 one = _mm512_set1_ps(1.f), sign = _mm512_set1_ps(-0.f);
      for (int64_t j = 0; j < I; j += 16) {
        const __mmask16 m = I - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (I - j)) - 1);
        const __m512 x = src.load(r, j, m);
        const __m512 e = Sleef_expf16_u10(_mm512_xor_ps(sign, x));
        const __m512 s = round_like(_mm512_div_ps(x, _mm512_add_ps(one, e)), T());
        store16(o + j, _mm512_mul_ps(s, src.load(r, I + j, m)), m);
      }
#else
      int64_t j = 0;
#ifdef PDSERVE_AVX2
      // torch's AVX2 SiLU runs its vector loop (SLEEF's exp) over whole 16-element steps and
      // its scalar loop (libm's exp) over the rest: the same split here gives the same bits
      const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
      for (const int64_t jv = I / 16 * 16; j < jv; j += 8) {
        const __m256 x = src.load8(r, j);
        const __m256 e = Sleef_expf8_u10(_mm256_xor_ps(sign, x));
        const __m256 s = round_like8(_mm256_div_ps(x, _mm256_add_ps(one, e)), T());
        store8(o + j, _mm256_mul_ps(s, src.load8(r, I + j)));
      }
#endif
      for (; j < I; ++j) {
        const float x = src.at(r, j);
        const float s = to_f(from_f<T>(x / (1.f + std::exp(-x))));
        o[j] = from_f<T>(s * src.at(r, I + j));
      }
#endif
      if (qo.q != nullptr) quant_row(o, I, qo.q + r * qo.qs, qo.scale + r * qo.ss);
    }
  });
}

void silu_mul(const at::Tensor& gu, at::Tensor out, const c10::optional<at::Tensor>& q,
              const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(gu.dim() == 2 && out.dim() == 2, "silu_mul: gu [rows, 2I], out [rows, I]");
  TORCH_CHECK(gu.size(0) == out.size(0) && gu.size(1) == 2 * out.size(1), "silu_mul: shapes differ");
  TORCH_CHECK(gu.stride(1) == 1 && out.stride(1) == 1, "silu_mul: rows must be contiguous");
  TORCH_CHECK(gu.scalar_type() == out.scalar_type(), "silu_mul: gu and out must share a dtype");
  const Quant qo = quant_outputs(q, scale, out, "silu_mul");
  if (gu.scalar_type() == at::kFloat) {
    silu_mul_impl<float>(DenseRows<float>{gu.data_ptr<float>(), gu.stride(0)}, out, qo);
  } else if (gu.scalar_type() == at::kBFloat16) {
    silu_mul_impl<bf16>(DenseRows<bf16>{gu.data_ptr<bf16>(), gu.stride(0)}, out, qo);
  } else {
    TORCH_CHECK(false, "silu_mul: float32 or bfloat16 only");
  }
}

// silu_mul of an int8 gate_up linear's int32 sums (acc [>= rows, 2I]) and scales, dequantized on
// the fly: bitwise silu_mul(int8_dequant(acc, x_scale, w_scale)).
void silu_mul_i32(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale, at::Tensor out,
                  const c10::optional<at::Tensor>& q, const c10::optional<at::Tensor>& scale) {
  TORCH_CHECK(out.dim() == 2 && out.stride(1) == 1, "silu_mul_i32: out [rows, I], rows contiguous");
  check_int8_sums(acc, x_scale, w_scale, out.size(0), 2 * out.size(1), "silu_mul_i32");
  const Quant qo = quant_outputs(q, scale, out, "silu_mul_i32");
  if (out.scalar_type() == at::kFloat) {
    silu_mul_impl<float>(Int32Rows<float>{acc.data_ptr<int32_t>(), acc.stride(0), x_scale.data_ptr<float>(),
                                        x_scale.stride(0), w_scale.data_ptr<float>()},
                         out, qo);
  } else if (out.scalar_type() == at::kBFloat16) {
    silu_mul_impl<bf16>(Int32Rows<bf16>{acc.data_ptr<int32_t>(), acc.stride(0), x_scale.data_ptr<float>(),
                                      x_scale.stride(0), w_scale.data_ptr<float>()},
                        out, qo);
  } else {
    TORCH_CHECK(false, "silu_mul_i32: float32 or bfloat16 output only");
  }
}

// ---- RoPE on q and k, in place -----------------------------------------------------------

template <typename T>
void rope_impl(at::Tensor& x, const at::Tensor& pos, const at::Tensor& cos, const at::Tensor& sin,
               int64_t heads, int64_t D) {
  const int64_t R = x.size(0), half = D / 2;
  T* xp = x.data_ptr<T>();
  const int64_t xs = x.stride(0);
  const int64_t* pp = pos.data_ptr<int64_t>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t cs = cos.stride(0), ss = sin.stride(0);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(heads * D, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> c1(half), c2(half), s1(half), s2(half);
    for (int64_t r = begin; r < end; ++r) {
      const T* cr = cp + pp[r] * cs;
      const T* sr = sp + pp[r] * ss;
      for (int64_t d = 0; d < half; ++d) {
        c1[d] = to_f(cr[d]);
        c2[d] = to_f(cr[half + d]);
        s1[d] = to_f(sr[d]);
        s2[d] = to_f(sr[half + d]);
      }
      for (int64_t hh = 0; hh < heads; ++hh) {
        T* a = xp + r * xs + hh * D;
        T* b = a + half;
        for (int64_t d = 0; d < half; ++d) {
          const float x1 = to_f(a[d]), x2 = to_f(b[d]);
          // apply_rope: out = x * cos; out[:half] -= x2 * sin[:half]; out[half:] += x1 * sin[half:]
          const float p1 = to_f(from_f<T>(x1 * c1[d])), q1 = to_f(from_f<T>(x2 * s1[d]));
          const float p2 = to_f(from_f<T>(x2 * c2[d])), q2 = to_f(from_f<T>(x1 * s2[d]));
          a[d] = from_f<T>(p1 - q1);
          b[d] = from_f<T>(p2 + q2);
        }
      }
    }
  });
}

void rope_qk(at::Tensor x, const at::Tensor& pos, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rope_qk: x [rows, >= heads * head_dim], rows contiguous");
  TORCH_CHECK(cos.dim() == 2 && sin.dim() == 2 && cos.stride(1) == 1 && sin.stride(1) == 1 &&
                  cos.sizes() == sin.sizes(),
              "rope_qk: cos and sin [positions, head_dim]");
  const int64_t D = cos.size(1);
  TORCH_CHECK(D % 2 == 0 && heads >= 0 && heads * D <= x.size(1), "rope_qk: heads * head_dim exceeds a row");
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == x.size(0) && pos.scalar_type() == at::kLong && pos.is_contiguous(),
              "rope_qk: one int64 position per row");
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && sin.scalar_type() == cos.scalar_type(),
              "rope_qk: x, cos and sin must share a dtype");
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t r = 0; r < pos.size(0); ++r)
    TORCH_CHECK(pp[r] >= 0 && pp[r] < cos.size(0), "rope_qk: position out of the table's range");
  if (x.scalar_type() == at::kFloat) {
    rope_impl<float>(x, pos, cos, sin, heads, D);
  } else if (x.scalar_type() == at::kBFloat16) {
    rope_impl<bf16>(x, pos, cos, sin, heads, D);
  } else {
    TORCH_CHECK(false, "rope_qk: float32 or bfloat16 only");
  }
}

// ---- int8 linear: int32 sums back to the model dtype ---------------------------------------

template <typename T>
void int8_dequant_impl(const at::Tensor& acc, const at::Tensor& xs, const at::Tensor& ws, at::Tensor& out) {
  const int64_t R = out.size(0), N = out.size(1);
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* xp = xs.data_ptr<float>();
  const float* wp = ws.data_ptr<float>();
  T* op = out.data_ptr<T>();
  const int64_t as = acc.stride(0), xss = xs.stride(0), os = out.stride(0);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1));
  at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* a = ap + r * as;
      const float x = xp[r * xss];
      T* o = op + r * os;
      for (int64_t j = 0; j < N; ++j) o[j] = from_f<T>((static_cast<float>(a[j]) * x) * wp[j]);
    }
  });
}

// out[:rows] = ((float(acc[:rows]) * x_scale) * w_scale) in out's dtype: linears.int8_linear's
// `(acc.float() * x_scale * w_scale).to(dtype)` in one pass (acc may have padding rows).
void int8_dequant(const at::Tensor& acc, const at::Tensor& x_scale, const at::Tensor& w_scale, at::Tensor out) {
  TORCH_CHECK(acc.dim() == 2 && out.dim() == 2 && acc.scalar_type() == at::kInt && acc.stride(1) == 1,
              "int8_dequant: acc int32 [>= rows, N], rows contiguous");
  TORCH_CHECK(out.stride(1) == 1 && acc.size(0) >= out.size(0) && acc.size(1) == out.size(1),
              "int8_dequant: out [rows, N] must fit acc");
  TORCH_CHECK(x_scale.scalar_type() == at::kFloat && x_scale.dim() == 2 && x_scale.size(0) == out.size(0) &&
                  x_scale.size(1) == 1,
              "int8_dequant: x_scale float32 [rows, 1]");
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.is_contiguous() && w_scale.numel() == out.size(1),
              "int8_dequant: w_scale float32 [N]");
  if (out.scalar_type() == at::kFloat) {
    int8_dequant_impl<float>(acc, x_scale, w_scale, out);
  } else if (out.scalar_type() == at::kBFloat16) {
    int8_dequant_impl<bf16>(acc, x_scale, w_scale, out);
  } else {
    TORCH_CHECK(false, "int8_dequant: float32 or bfloat16 output only");
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def(
      "rms_norm(Tensor(a!) h, Tensor? residual, Tensor w, float eps, int lanes, Tensor(b!) out, "
      "Tensor(c!)? q=None, Tensor(d!)? scale=None) -> ()");
  m.def("silu_mul(Tensor gu, Tensor(a!) out, Tensor(b!)? q=None, Tensor(c!)? scale=None) -> ()");
  m.def("rope_qk(Tensor(a!) x, Tensor pos, Tensor cos, Tensor sin, int heads) -> ()");
  m.def("int8_dequant(Tensor acc, Tensor x_scale, Tensor w_scale, Tensor(a!) out) -> ()");
  m.def(
      "rms_norm_i32(Tensor(a!) h, Tensor acc, Tensor x_scale, Tensor w_scale, Tensor w, float eps, int lanes, "
      "Tensor(b!) out, Tensor(c!)? q=None, Tensor(d!)? scale=None) -> ()");
  m.def(
      "silu_mul_i32(Tensor acc, Tensor x_scale, Tensor w_scale, Tensor(a!) out, Tensor(b!)? q=None, "
      "Tensor(c!)? scale=None) -> ()");
  m.def("int8_quant(Tensor x, Tensor(a!) q, Tensor(b!) scale) -> ()");
}

TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_mul", &silu_mul);
  m.impl("rope_qk", &rope_qk);
  m.impl("int8_dequant", &int8_dequant);
  m.impl("rms_norm_i32", &rms_norm_i32);
  m.impl("silu_mul_i32", &silu_mul_i32);
  m.impl("int8_quant", &int8_quant);
}
