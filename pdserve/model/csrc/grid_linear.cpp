// Linear layers over weights kept in their GGUF grid, for small batches (issue #12).
//
// A GGUF Q4_1 tensor holds, per group of 32 weights along K, an fp16 scale d, an fp16 minimum m
// and 4-bit codes q: w = d * q + m. Q8_0 holds d and int8 codes: w = d * q. Dequantized to
// float32 once at load (pdserve/model/loader.py), those values are exact, and the float32 model
// multiplies by them. These kernels multiply by the same values rebuilt from the codes instead:
// 4.5 (Q4_1) or 8.5 (Q8_0) bits per weight are read instead of 32, which is what a decode step
// of a few rows is bound by. Per group, the 32 weights are rebuilt in registers exactly as the
// dequantization rounds them (Q4_1: a 16-entry table d * k + m looked up by the nibbles; Q8_0:
// d * q), and then
//
//   y[r, n] = sum_j x[r, j] * w[n, j]
//
// in float32, two FMAs per row and group of 32, as a dense product does. Only the order of the
// sums differs from a dense matmul, so the output is the float32 model's, not an approximation
// of it (pdserve/model/grid.py re-derives the codes from the float32 weights and uses them only
// where they reproduce every weight bit for bit). Each row's sums run in the same order
// whatever the other rows are, so a request's logits do not depend on what it was batched with.
//
// Layouts (pdserve/model/grid.py): Q4: codes uint8 [N, K/2], per group of 32 the low nibbles are
// elements 0..15 and the high nibbles 16..31 (GGUF's order); d, m float16 [N, K/32] (GGUF's own
// precision: 20 bytes per group read instead of 24 with float32 scales). Q8: codes int8 [N, K];
// d float16 [N, K/32]. x float32 [M, K], contiguous.
//
// Registered as torch.ops.pdserve_cpu.grid_linear_q4(x, codes, d, m) and
// grid_linear_q8(x, codes, d); grid_simd() says whether a SIMD path was compiled in (without
// one the scalar loop is correct but slower than a dense matmul, and pdserve does not use these
// ops).
//
// Two SIMD paths, one compiled in by -march=native: AVX-512 (16 lanes, 32 registers; preferred)
// and, since session 8, AVX2 + FMA + F16C (8 lanes, 16 registers; AMD EPYC and other CPUs
// without AVX-512). Same contract on both: the weights rebuilt with a separate multiply and add
// (d * q, then + m), FMAs only for x * w, each (output, row) sum in a fixed order. The AVX2 path
// rebuilds Q4_1 lane by lane (convert, multiply, add) instead of through a 16-entry vpermps
// table (AVX2's vpermps has 8 entries), reads x from L1 in each FMA rather than holding it in
// registers, and tiles 2 rows x 4 outputs or 4 rows x 2 outputs (8 accumulators). On a 2-core
// AMD EPYC (Zen 3) it made single-stream float32 decode through a server 2.9-3.1x faster than
// oneDNN's dense float32 weights (77-82 against 23-27 tok/s) and batches of 8 rows 1.5x
// (benchmarks/bench_grid_decode.py, docs/benchmarks.md "Session 8: AVX2 grid linears").

// No multiply-add contraction anywhere in this file: the weights are rebuilt from the codes
// with the dequantization's two roundings (d * q, then + m), and grid_derive checks them so.
#pragma GCC optimize("fp-contract=off")

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <tuple>

#if defined(__F16C__) || (defined(__AVX512F__) && defined(__AVX512BW__))
#include <immintrin.h>
#endif
// AVX-512 where the compiler targets it (preferred), else AVX2 + FMA + F16C (8 lanes), else the
// scalar loop. Exactly one of the two SIMD paths is compiled in.
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PDSERVE_GRID_AVX512 1
#define PDSERVE_GRID_AVX2 0
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PDSERVE_GRID_AVX512 0
#define PDSERVE_GRID_AVX2 1
#else
#define PDSERVE_GRID_AVX512 0
#define PDSERVE_GRID_AVX2 0
#endif

namespace {

constexpr int64_t kGroup = 32;

using half_t = c10::Half;

inline float h2f(half_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h.x);  // one vcvtph2ps
#else
  return static_cast<float>(h);
#endif
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "grid_linear: x must be a contiguous float32 [M, K] tensor");
  TORCH_CHECK(x.size(1) == K, "grid_linear: x has ", x.size(1), " columns, the weight ", K);
  TORCH_CHECK(K % kGroup == 0, "grid_linear: K must be a multiple of 32");
}

#if PDSERVE_GRID_AVX512
// The group's 32 weights as two vectors of 16 floats, exactly the float32 values the codes stand
// for. Q4_1: a 16-entry table t[k] = d * k + m (two roundings, as the dequantization and
// grid_derive's check round: fp-contract is off around these kernels), looked up by the nibbles
// (vpermps reads the low 4 bits of each lane's index, so the low nibble needs no mask). Q8_0:
// d * q, one rounding, as dequantized. Either way the kernel then multiplies x by the weights
// themselves: two FMAs per row and group, as a dense product does.
template <bool Q4>
inline void group_weights(const uint8_t* codes, int64_t code_stride, float d, float m, int64_t n, int64_t g,
                          __m512& w0, __m512& w1) {
  const __m512 dv = _mm512_set1_ps(d);
  if constexpr (Q4) {
    const __m512 iota = _mm512_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f, 8.f, 9.f, 10.f, 11.f, 12.f, 13.f,
                                       14.f, 15.f);
    const __m512 table = _mm512_add_ps(_mm512_mul_ps(dv, iota), _mm512_set1_ps(m));
    const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + n * code_stride + g * 16)));
    w0 = _mm512_permutexvar_ps(c, table);
    w1 = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4), table);
  } else {
    const int8_t* c = reinterpret_cast<const int8_t*>(codes) + n * code_stride + g * kGroup;
    w0 = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c)))));
    w1 = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)))));
  }
}

// n float16 values -> float (n <= 32), 16 at a time with vcvtph2ps
inline void widen(const half_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_store_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
  for (; i < n; ++i) dst[i] = h2f(src[i]);
}

// NB outputs x R rows per block, all accumulators in registers (compile-time counts): a group's
// weights are decoded once per output and used by every row; x is loaded once per group and
// used by every output; NB * R independent FMA chains hide the FMA latency. Each (output, row)
// accumulator sees the same sequence of FMAs whatever NB and R are, so a row's result does not
// depend on the other rows of the batch.
template <int NB, int R, bool Q4>
inline void grid_block(const float* xp, int64_t K, int64_t G, const uint8_t* codes, int64_t code_stride,
                       const half_t* dp, const half_t* mp, int64_t n, float* yp, int64_t N) {
  __m512 acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm512_setzero_ps();
  constexpr int64_t kChunk = 32;  // groups whose float16 d and m are widened at once
  alignas(64) float dbuf[NB][kChunk], mbuf[NB][kChunk];
  for (int64_t g0 = 0; g0 < G; g0 += kChunk) {
    const int64_t gn = std::min(kChunk, G - g0);
    for (int b = 0; b < NB; ++b) {
      widen(dp + (n + b) * G + g0, gn, dbuf[b]);
      if constexpr (Q4) widen(mp + (n + b) * G + g0, gn, mbuf[b]);
    }
    for (int64_t j = 0; j < gn; ++j) {
      const int64_t g = g0 + j;
      __m512 x0[R], x1[R];
      for (int r = 0; r < R; ++r) {
        x0[r] = _mm512_loadu_ps(xp + r * K + g * kGroup);
        x1[r] = _mm512_loadu_ps(xp + r * K + g * kGroup + 16);
      }
      for (int b = 0; b < NB; ++b) {
        __m512 w0, w1;
        group_weights<Q4>(codes, code_stride, dbuf[b][j], Q4 ? mbuf[b][j] : 0.f, n + b, g, w0, w1);
        for (int r = 0; r < R; ++r) {
          acc[b][r] = _mm512_fmadd_ps(x0[r], w0, acc[b][r]);
          acc[b][r] = _mm512_fmadd_ps(x1[r], w1, acc[b][r]);
        }
      }
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) yp[r * N + n + b] = _mm512_reduce_add_ps(acc[b][r]);
}

template <int NB, bool Q4>
inline void grid_rows(const float* xp, int64_t K, int64_t G, int64_t M, const uint8_t* codes, int64_t code_stride,
                      const half_t* dp, const half_t* mp, int64_t n, float* yp, int64_t N) {
  int64_t r = 0;
  for (; r + 4 <= M; r += 4) grid_block<NB, 4, Q4>(xp + r * K, K, G, codes, code_stride, dp, mp, n, yp + r * N, N);
  switch (M - r) {
    case 3: grid_block<NB, 3, Q4>(xp + r * K, K, G, codes, code_stride, dp, mp, n, yp + r * N, N); break;
    case 2: grid_block<NB, 2, Q4>(xp + r * K, K, G, codes, code_stride, dp, mp, n, yp + r * N, N); break;
    case 1: grid_block<NB, 1, Q4>(xp + r * K, K, G, codes, code_stride, dp, mp, n, yp + r * N, N); break;
    default: break;
  }
}
#endif

#if PDSERVE_GRID_AVX2
// The AVX2 path (8 lanes, 16 ymm registers): the same contract and the same per-(output, row)
// order of sums whatever the tile is, laid out for half the lanes and half the registers.
//
// A group's 32 weights as four vectors of 8 floats (elements 0..7, 8..15, 16..23, 24..31),
// exactly the float32 values the codes stand for. Q4_1: d * k, then + m, computed lane by lane
// with a separate multiply and add (the AVX-512 path's table holds the same d * k + m values;
// AVX2's vpermps has 8 entries, so a 16-entry lookup would cost two permutes and a blend per
// vector, more than the convert, multiply and add). Q8_0: d * q.
template <bool Q4>
inline void group_weights8(const uint8_t* cn, int64_t g, float d, float m, __m256 w[4]) {
  const __m256 dv = _mm256_set1_ps(d);
  if constexpr (Q4) {
    // bytes 0..7 and 8..15 of the group's 16: low nibbles are elements 0..15, high 16..31
    const uint8_t* c = cn + g * 16;
    const __m256i c0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c)));
    const __m256i c1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8)));
    const __m256i lo4 = _mm256_set1_epi32(0x0F);
    const __m256 mv = _mm256_set1_ps(m);
    const __m256i q[4] = {_mm256_and_si256(c0, lo4), _mm256_and_si256(c1, lo4), _mm256_srli_epi32(c0, 4),
                          _mm256_srli_epi32(c1, 4)};
    for (int s = 0; s < 4; ++s) w[s] = _mm256_add_ps(_mm256_mul_ps(dv, _mm256_cvtepi32_ps(q[s])), mv);
  } else {
    const int8_t* c = reinterpret_cast<const int8_t*>(cn) + g * kGroup;
    for (int s = 0; s < 4; ++s)
      w[s] = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                   _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * s)))));
  }
}

// n float16 values -> float (n <= 32), 8 at a time with vcvtph2ps
inline void widen8(const half_t* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_store_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = h2f(src[i]);
}

// The 8 lanes' sum in one fixed order (halves, then pairs, then the last two).
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// NB outputs x R rows, all accumulators in registers: each group's weights are rebuilt once per
// output and used by the R rows; x is read from L1 by each FMA (memory operand) rather than held
// in registers, which AVX2's 16 do not have room for. Each (output, row) accumulator sees
// acc = fma(x[s], w[s], acc) for s = 0..3 in every group, in group order, whatever NB and R are:
// a row's result does not depend on the other rows of the batch.
template <int NB, int R, bool Q4>
inline void grid_block8(const float* xp, int64_t K, int64_t G, const uint8_t* codes, int64_t code_stride,
                        const half_t* dp, const half_t* mp, int64_t n, float* yp, int64_t N) {
  __m256 acc[NB][R];
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) acc[b][r] = _mm256_setzero_ps();
  constexpr int64_t kChunk = 32;  // groups whose float16 d and m are widened at once
  alignas(32) float dbuf[NB][kChunk], mbuf[NB][kChunk];
  for (int64_t g0 = 0; g0 < G; g0 += kChunk) {
    const int64_t gn = std::min(kChunk, G - g0);
    for (int b = 0; b < NB; ++b) {
      widen8(dp + (n + b) * G + g0, gn, dbuf[b]);
      if constexpr (Q4) widen8(mp + (n + b) * G + g0, gn, mbuf[b]);
    }
    for (int64_t j = 0; j < gn; ++j) {
      const int64_t g = g0 + j;
      const float* xg = xp + g * kGroup;
      for (int b = 0; b < NB; ++b) {
        // the same group's codes NB outputs on (the next block, read after this one): the
        // hardware prefetcher alone left a single thread at ~4.5 GB/s on the Q8_0 lm_head
        _mm_prefetch(reinterpret_cast<const char*>(codes + (n + b + NB) * code_stride + g * (Q4 ? 16 : kGroup)),
                     _MM_HINT_T0);
        __m256 w[4];
        group_weights8<Q4>(codes + (n + b) * code_stride, g, dbuf[b][j], Q4 ? mbuf[b][j] : 0.f, w);
        for (int s = 0; s < 4; ++s)
          for (int r = 0; r < R; ++r) acc[b][r] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + r * K + 8 * s), w[s], acc[b][r]);
      }
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int r = 0; r < R; ++r) yp[r * N + n + b] = hsum8(acc[b][r]);
}

// NB_MAX outputs (4, or 1 for the last ones), every row: tiles of 2 rows x 4 outputs (8
// accumulators), or 4 rows x 2 outputs where there are 4 rows (each output's weights are then
// rebuilt for 4 rows at a time, and 8 accumulators still fit).
template <int NB_MAX, bool Q4>
inline void grid_rows8(const float* xp, int64_t K, int64_t G, int64_t M, const uint8_t* codes, int64_t code_stride,
                       const half_t* dp, const half_t* mp, int64_t n, float* yp, int64_t N) {
  constexpr int NB4 = NB_MAX >= 2 ? 2 : 1;  // outputs per 4-row tile
  int64_t r = 0;
  for (; r + 4 <= M; r += 4)
    for (int b = 0; b < NB_MAX; b += NB4)
      grid_block8<NB4, 4, Q4>(xp + r * K, K, G, codes, code_stride, dp, mp, n + b, yp + r * N, N);
  switch (M - r) {
    case 3:
      for (int b = 0; b < NB_MAX; b += NB4)
        grid_block8<NB4, 3, Q4>(xp + r * K, K, G, codes, code_stride, dp, mp, n + b, yp + r * N, N);
      break;
    case 2: grid_block8<NB_MAX, 2, Q4>(xp + r * K, K, G, codes, code_stride, dp, mp, n, yp + r * N, N); break;
    case 1: grid_block8<NB_MAX, 1, Q4>(xp + r * K, K, G, codes, code_stride, dp, mp, n, yp + r * N, N); break;
    default: break;
  }
}
#endif

// One scalar output (no SIMD path; same sums per row whatever M is): x times the dequantized
// weights, rounded as the dequantization rounds.
template <bool Q4>
float grid_scalar(const float* xr, int64_t G, const uint8_t* cn, const half_t* dn, const half_t* mn) {
  float acc = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    if constexpr (Q4) {
      for (int64_t j = 0; j < 16; ++j) {
        const uint8_t b = cn[g * 16 + j];
        const float lo = h2f(dn[g]) * static_cast<float>(b & 0x0F);
        const float hi = h2f(dn[g]) * static_cast<float>(b >> 4);
        acc += xr[g * kGroup + j] * (lo + h2f(mn[g]));
        acc += xr[g * kGroup + 16 + j] * (hi + h2f(mn[g]));
      }
    } else {
      const int8_t* c = reinterpret_cast<const int8_t*>(cn);
      for (int64_t j = 0; j < kGroup; ++j) acc += xr[g * kGroup + j] * (h2f(dn[g]) * static_cast<float>(c[g * kGroup + j]));
    }
  }
  return acc;
}

template <bool Q4>
at::Tensor grid_linear_impl(const at::Tensor& x, const uint8_t* cp, int64_t N, int64_t K, const half_t* dp,
                            const half_t* mp) {
  const int64_t M = x.size(0), G = K / kGroup;
  const int64_t code_stride = Q4 ? K / 2 : K;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int64_t NB = 4;
  const int64_t blocks = (N + NB - 1) / NB;
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b * NB;
#if PDSERVE_GRID_AVX512
      if (n + NB <= N) {
        grid_rows<NB, Q4>(xp, K, G, M, cp, code_stride, dp, mp, n, yp, N);
      } else {
        for (int64_t j = n; j < N; ++j) grid_rows<1, Q4>(xp, K, G, M, cp, code_stride, dp, mp, j, yp, N);
      }
#elif PDSERVE_GRID_AVX2
      if (n + NB <= N) {
        grid_rows8<NB, Q4>(xp, K, G, M, cp, code_stride, dp, mp, n, yp, N);
      } else {
        for (int64_t j = n; j < N; ++j) grid_rows8<1, Q4>(xp, K, G, M, cp, code_stride, dp, mp, j, yp, N);
      }
#else
      for (int64_t j = n; j < std::min(N, n + NB); ++j)
        for (int64_t r = 0; r < M; ++r)
          yp[r * N + j] = grid_scalar<Q4>(xp + r * K, G, cp + j * code_stride,
                                          dp + j * G, Q4 ? mp + j * G : nullptr);
#endif
    }
  });
  return y;
}

at::Tensor grid_linear_q4(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d,
                          const at::Tensor& m) {
  const int64_t N = codes.size(0), K = codes.size(1) * 2, G = K / kGroup;
  check_x(x, K);
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "grid_linear_q4: codes must be contiguous uint8 [N, K/2]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && m.scalar_type() == at::kHalf && d.is_contiguous() &&
                  m.is_contiguous() && d.numel() == N * G && m.numel() == N * G,
              "grid_linear_q4: d and m must be contiguous float16 [N, K/32]");
  return grid_linear_impl<true>(x, codes.data_ptr<uint8_t>(), N, K, d.data_ptr<half_t>(), m.data_ptr<half_t>());
}

at::Tensor grid_linear_q8(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d) {
  const int64_t N = codes.size(0), K = codes.size(1), G = K / kGroup;
  check_x(x, K);
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              "grid_linear_q8: codes must be contiguous int8 [N, K]");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.numel() == N * G,
              "grid_linear_q8: d must be a contiguous float16 [N, K/32]");
  return grid_linear_impl<false>(x, reinterpret_cast<const uint8_t*>(codes.data_ptr<int8_t>()), N, K,
                                 d.data_ptr<half_t>(), nullptr);
}

// The codes of a float32 weight, one pass, or ok = false unless they reproduce every weight bit
// for bit (pdserve/model/grid.py: q4_grid / q8_grid hold the rule and its reasons).
// Q4_1: m = group minimum (must be a float16 value, as GGUF stores it), d = fp16(range / 15),
// q = round((w - m) / d), check d * q + m == w. Q8_0: d = fp16(absmax / 127), q = round(w / d),
// check d * q == w. Each float operation is rounded on its own (no contraction in this file),
// the same in the AVX-512 loop and the scalar one.
template <bool Q4>
bool derive_group(const float* v, uint8_t* c, half_t* dout, half_t* mout) {
#if PDSERVE_GRID_AVX512
  const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
  const float lo = _mm512_reduce_min_ps(_mm512_min_ps(v0, v1));
  const float hi = _mm512_reduce_max_ps(_mm512_max_ps(v0, v1));
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
#elif PDSERVE_GRID_AVX2
  const __m256 vs[4] = {_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8), _mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24)};
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 vmin = vs[0], vmax = vs[0], vabs = _mm256_andnot_ps(sign, vs[0]);
  for (int i = 1; i < 4; ++i) {
    vmin = _mm256_min_ps(vmin, vs[i]);
    vmax = _mm256_max_ps(vmax, vs[i]);
    vabs = _mm256_max_ps(vabs, _mm256_andnot_ps(sign, vs[i]));
  }
  alignas(32) float lanes[3][8];
  _mm256_store_ps(lanes[0], vmin);
  _mm256_store_ps(lanes[1], vmax);
  _mm256_store_ps(lanes[2], vabs);
  float lo = lanes[0][0], hi = lanes[1][0], amax = lanes[2][0];
  for (int j = 1; j < 8; ++j) {
    lo = std::min(lo, lanes[0][j]);
    hi = std::max(hi, lanes[1][j]);
    amax = std::max(amax, lanes[2][j]);
  }
#else
  float lo = v[0], hi = v[0], amax = std::fabs(v[0]);
  for (int j = 1; j < kGroup; ++j) {
    lo = std::min(lo, v[j]);
    hi = std::max(hi, v[j]);
    amax = std::max(amax, std::fabs(v[j]));
  }
#endif
  const half_t dh(Q4 ? (hi - lo) / 15.0f : amax / 127.0f);
  const float dd = h2f(dh);
  const float inv = dd > 0.f ? 1.f / dd : 1.f;  // the codes are integers: x * (1/d) rounds to them
  *dout = dh;
  if constexpr (Q4) {
    const half_t mh(lo);
    if (h2f(mh) != lo) return false;  // a minimum GGUF could not have stored
    *mout = mh;
  }
#if PDSERVE_GRID_AVX512
  const __m512 vi = _mm512_set1_ps(inv), vd = _mm512_set1_ps(dd), vl = _mm512_set1_ps(Q4 ? lo : 0.f);
  const __m512 half = _mm512_set1_ps(0.5f);
  const __m512 qlo = _mm512_set1_ps(Q4 ? 0.f : -128.f), qhi = _mm512_set1_ps(Q4 ? 15.f : 127.f);
  __m512i q[2];
  const __m512 vs[2] = {v0, v1};
  for (int i = 0; i < 2; ++i) {
    const __m512 t = Q4 ? _mm512_sub_ps(vs[i], vl) : vs[i];
    __m512 r = _mm512_roundscale_ps(_mm512_add_ps(_mm512_mul_ps(t, vi), half), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    r = _mm512_min_ps(qhi, _mm512_max_ps(qlo, r));
    const __m512 prod = _mm512_mul_ps(vd, r);
    const __m512 back = Q4 ? _mm512_add_ps(prod, vl) : prod;
    if (_mm512_cmp_ps_mask(back, vs[i], _CMP_NEQ_UQ) != 0) return false;
    q[i] = _mm512_cvtps_epi32(r);
  }
  if constexpr (Q4) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(c), _mm512_cvtepi32_epi8(_mm512_or_si512(q[0], _mm512_slli_epi32(q[1], 4))));
  } else {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(c), _mm512_cvtepi32_epi8(q[0]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(c + 16), _mm512_cvtepi32_epi8(q[1]));
  }
#elif PDSERVE_GRID_AVX2
  const __m256 vi = _mm256_set1_ps(inv), vd = _mm256_set1_ps(dd), vl = _mm256_set1_ps(Q4 ? lo : 0.f);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 qlo = _mm256_set1_ps(Q4 ? 0.f : -128.f), qhi = _mm256_set1_ps(Q4 ? 15.f : 127.f);
  alignas(32) int32_t q[kGroup];
  for (int i = 0; i < 4; ++i) {
    const __m256 t = Q4 ? _mm256_sub_ps(vs[i], vl) : vs[i];
    __m256 r = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(t, vi), half));
    r = _mm256_min_ps(qhi, _mm256_max_ps(qlo, r));
    const __m256 prod = _mm256_mul_ps(vd, r);
    const __m256 back = Q4 ? _mm256_add_ps(prod, vl) : prod;
    if (_mm256_movemask_ps(_mm256_cmp_ps(back, vs[i], _CMP_NEQ_UQ)) != 0) return false;
    _mm256_store_si256(reinterpret_cast<__m256i*>(q + 8 * i), _mm256_cvtps_epi32(r));
  }
  if constexpr (Q4) {
    for (int j = 0; j < 16; ++j) c[j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
  } else {
    for (int j = 0; j < kGroup; ++j) reinterpret_cast<int8_t*>(c)[j] = static_cast<int8_t>(q[j]);
  }
#else
  float q[kGroup];
  for (int j = 0; j < kGroup; ++j) {
    const float r = std::floor((Q4 ? v[j] - lo : v[j]) * inv + 0.5f);
    q[j] = Q4 ? std::min(15.f, std::max(0.f, r)) : std::min(127.f, std::max(-128.f, r));
    const float prod = dd * q[j];
    if ((Q4 ? prod + lo : prod) != v[j]) return false;
  }
  if constexpr (Q4) {
    for (int j = 0; j < 16; ++j)
      c[j] = static_cast<uint8_t>(static_cast<uint8_t>(q[j]) | (static_cast<uint8_t>(q[j + 16]) << 4));
  } else {
    for (int j = 0; j < kGroup; ++j) reinterpret_cast<int8_t*>(c)[j] = static_cast<int8_t>(q[j]);
  }
#endif
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> grid_derive(const at::Tensor& w, bool q4) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(),
              "grid_derive: w must be a contiguous float32 [N, K] tensor");
  const int64_t N = w.size(0), K = w.size(1), G = K / kGroup;
  TORCH_CHECK(K % kGroup == 0, "grid_derive: K must be a multiple of 32");
  at::Tensor codes = at::empty({N, q4 ? K / 2 : K}, w.options().dtype(q4 ? at::kByte : at::kChar));
  at::Tensor d = at::empty({N, G}, w.options().dtype(at::kHalf));
  at::Tensor m = at::empty({q4 ? N : 0, q4 ? G : 0}, w.options().dtype(at::kHalf));
  const float* wp = w.data_ptr<float>();
  uint8_t* cp = static_cast<uint8_t*>(codes.data_ptr());
  half_t* dp = d.data_ptr<half_t>();
  half_t* mp = q4 ? m.data_ptr<half_t>() : nullptr;
  const int64_t cs = q4 ? K / 2 : K, cg = q4 ? 16 : kGroup;
  std::atomic<bool> ok{true};
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1 && ok.load(std::memory_order_relaxed); ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const bool good = q4 ? derive_group<true>(wp + n * K + g * kGroup, cp + n * cs + g * cg, dp + n * G + g,
                                                  mp + n * G + g)
                             : derive_group<false>(wp + n * K + g * kGroup, cp + n * cs + g * cg, dp + n * G + g,
                                                   nullptr);
        if (!good) {
          ok.store(false, std::memory_order_relaxed);
          break;
        }
      }
    }
  });
  return {codes, d, m, ok.load()};
}

bool grid_simd() { return PDSERVE_GRID_AVX512 != 0 || PDSERVE_GRID_AVX2 != 0; }

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("grid_linear_q4(Tensor x, Tensor codes, Tensor d, Tensor m) -> Tensor");
  m.def("grid_linear_q8(Tensor x, Tensor codes, Tensor d) -> Tensor");
  m.def("grid_simd() -> bool", &grid_simd);
  m.def("grid_derive(Tensor w, bool q4) -> (Tensor, Tensor, Tensor, bool)");
}

TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("grid_linear_q4", &grid_linear_q4);
  m.impl("grid_linear_q8", &grid_linear_q8);
  m.impl("grid_derive", &grid_derive);
}
