// Decode attention that reads pdserve's paged KV pool in place (issue #12).
//
// KV pool: kv [num_pages, num_layers, 2, page_size, num_kv_heads, head_dim], contiguous
// (pdserve/model/attention.py). For each decode request b and KV head h, one pass over the
// request's pages: the G = Hq / Hkv query heads of the group share every K and V row load,
// and the softmax is computed online (running max and sum, rescaled once per page), so
// nothing is gathered or materialised: each K/V byte of the context is read once.
//
// float32 runs vector kernels: AVX-512 (16 lanes) where compiled in, else AVX2 + FMA (8 lanes,
// e.g. AMD Zen 3; session 8); bfloat16 and other CPUs run the portable loops below.
//
// Registered as torch.ops.pdserve_cpu.paged_decode(q, kv, table, lens, layer, scale, out).
// Built by pdserve/model/cpu_kernels.py with torch.utils.cpp_extension (-O3 -march=native).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define PDSERVE_ATTN_SIMD 1
// SLEEF's 16-lane exp (1.0 ulp), exported by libtorch_cpu: the one torch's vectorized exp and
// softmax use on AVX-512 (elementwise.cpp declares the same symbol).
extern "C" __m512 Sleef_expf16_u10(__m512);
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PDSERVE_ATTN_SIMD 2
// SLEEF's 8-lane exp (1.0 ulp), exported by libtorch_cpu: the one torch's AVX2 Vectorized<float>
// uses (extend_attention.cpp and elementwise.cpp declare the same symbol).
extern "C" __m256 Sleef_expf8_u10(__m256);
#else
#define PDSERVE_ATTN_SIMD 0
#endif

namespace {

template <typename T>
inline float to_f(T x) {
  return static_cast<float>(x);
}

// Sizes and strides of one paged_decode call: the query/output rows, the pool's page layout and
// where `layer`'s K block starts in a page. Both kernels below read them from here.
struct PagedGeometry {
  int64_t B, Hq, D, Hkv, G, ps, npg;  // requests, query heads, head dim, KV heads, Hq / Hkv, page size, table width
  int64_t qs0, qs1, os0, os1;         // q / out strides (request, head)
  int64_t tok_stride;                 // next token in a page
  int64_t kv_half;                    // K block of a page -> its V block
  int64_t page_stride, layer_off;     // next page; `layer`'s K block within a page
  PagedGeometry(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& table, const at::Tensor& out,
                int64_t layer)
      : B(q.size(0)), Hq(q.size(1)), D(q.size(2)), Hkv(kv.size(4)), G(Hq / Hkv), ps(kv.size(3)),
        npg(table.size(1)), qs0(q.stride(0)), qs1(q.stride(1)), os0(out.stride(0)), os1(out.stride(1)),
        tok_stride(Hkv * D), kv_half(ps * Hkv * D), page_stride(kv.size(1) * 2 * kv_half),
        layer_off(layer * 2 * kv_half) {}
};

template <typename T>
void paged_decode_impl(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& table,
                       const at::Tensor& lens, int64_t layer, double scale, at::Tensor& out) {
  const PagedGeometry geo(q, kv, table, out, layer);
  const int64_t B = geo.B, D = geo.D, Hkv = geo.Hkv, G = geo.G, ps = geo.ps, npg = geo.npg;
  const int64_t qs0 = geo.qs0, qs1 = geo.qs1, os0 = geo.os0, os1 = geo.os1;
  const int64_t tok_stride = geo.tok_stride, kv_half = geo.kv_half;
  const int64_t page_stride = geo.page_stride, layer_off = geo.layer_off;
  const T* kvp = kv.data_ptr<T>();
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);
  const float neg_inf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), s(G * ps), m(G), l(G);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / Hkv, h = w % Hkv;
      const int64_t len = lp[b];
      for (int64_t g = 0; g < G; ++g) {
        const T* qrow = qp + b * qs0 + (h * G + g) * qs1;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f(qrow[d]) * sc;
        m[g] = neg_inf;
        l[g] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t pages = (len + ps - 1) / ps;
      for (int64_t pi = 0; pi < pages; ++pi) {
        const int64_t page = tp[b * npg + pi];
        const int64_t n = std::min(ps, len - pi * ps);
        const T* kb = kvp + page * page_stride + layer_off + h * D;
        const T* vb = kb + kv_half;
        // scores of the page's n tokens for every query head of the group: s[g][t]
        for (int64_t t = 0; t < n; ++t) {
          const T* k = kb + t * tok_stride;
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf.data() + g * D;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * to_f(k[d]);
            s[g * ps + t] = dot;
          }
        }
        // online softmax: new running max, rescale what was accumulated, exponentiate
        for (int64_t g = 0; g < G; ++g) {
          float* sg = s.data() + g * ps;
          float mx = m[g];
          for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sg[t]);
          const float corr = m[g] == neg_inf ? 0.f : std::exp(m[g] - mx);
          float sum = 0.f;
          for (int64_t t = 0; t < n; ++t) {
            sg[t] = std::exp(sg[t] - mx);
            sum += sg[t];
          }
          l[g] = l[g] * corr + sum;
          m[g] = mx;
          if (corr != 1.f) {
            float* ag = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
          }
        }
        // acc[g] += sum_t p[g][t] * V[t]
        for (int64_t t = 0; t < n; ++t) {
          const T* v = vb + t * tok_stride;
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * ps + t];
            float* ag = acc.data() + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += p * to_f(v[d]);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        T* orow = op + b * os0 + (h * G + g) * os1;
        for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  });
}

#if PDSERVE_ATTN_SIMD == 1
// float32, head_dim a multiple of 16 up to 256: the same one pass with AVX-512 (issue #12: the
// scalar loops above cost ~100 us per layer for one short sequence). Work items are (request,
// KV head, query heads g0..g1 of its group); the heads of one item share each K/V row load. A
// query head's arithmetic is the same whichever item it falls in (every head runs its own
// FMA chains, in the same order), so its output does not depend on how the work was split or
// on the other requests of the batch. Per page, 16 tokens at a time: scores (one dot product
// of D/16 vectors per token), online softmax over the 16 lanes with SLEEF's exp, then
// acc += p[t] * V[t].
template <int DV>
void decode_item_f32(const float* qp, int64_t qs1, const float* kvp, const int64_t* tab, int64_t len, int64_t ps,
                     int64_t page_stride, int64_t layer_off, int64_t kv_half, int64_t tok_stride, int64_t h,
                     int64_t D, int64_t hq0, int64_t ng, float sc, float* op, int64_t os1) {
  constexpr int kMaxG = 8;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t g0 = 0; g0 < ng; g0 += kMaxG) {
    const int64_t G = std::min<int64_t>(kMaxG, ng - g0);
    __m512 qv[kMaxG][DV], acc[kMaxG][DV];
    float m[kMaxG], l[kMaxG];
    alignas(64) float p[kMaxG][16];
    for (int64_t g = 0; g < G; ++g) {
      const float* qrow = qp + (hq0 + g0 + g) * qs1;
      for (int v = 0; v < DV; ++v) {
        qv[g][v] = _mm512_mul_ps(_mm512_loadu_ps(qrow + 16 * v), _mm512_set1_ps(sc));
        acc[g][v] = _mm512_setzero_ps();
      }
      m[g] = neg_inf;
      l[g] = 0.f;
    }
    for (int64_t start = 0; start < len; start += 16) {
      // 16 tokens (or fewer at the end); pages are ps tokens, so a chunk may span pages
      const int64_t n = std::min<int64_t>(16, len - start);
      const float* krow[16];
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = start + t;
        krow[t] = kvp + tab[pos / ps] * page_stride + layer_off + (pos % ps) * tok_stride + h * D;
      }
      for (int64_t g = 0; g < G; ++g) {
        alignas(64) float s[16];
        for (int64_t t = 0; t < n; ++t) {
          __m512 d0 = _mm512_mul_ps(qv[g][0], _mm512_loadu_ps(krow[t]));
          for (int v = 1; v < DV; ++v) d0 = _mm512_fmadd_ps(qv[g][v], _mm512_loadu_ps(krow[t] + 16 * v), d0);
          s[t] = _mm512_reduce_add_ps(d0);
        }
        const __mmask16 k = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
        const __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(neg_inf), k, s);
        const float mx = std::max(m[g], _mm512_reduce_max_ps(sv));
        const __m512 pv = _mm512_maskz_mov_ps(k, Sleef_expf16_u10(_mm512_sub_ps(sv, _mm512_set1_ps(mx))));
        _mm512_store_ps(p[g], pv);
        const float sum = _mm512_reduce_add_ps(pv);
        if (m[g] != mx) {
          const float corr = m[g] == neg_inf ? 0.f : std::exp(m[g] - mx);
          const __m512 cv = _mm512_set1_ps(corr);
          for (int v = 0; v < DV; ++v) acc[g][v] = _mm512_mul_ps(acc[g][v], cv);
          l[g] *= corr;
          m[g] = mx;
        }
        l[g] += sum;
      }
      for (int64_t t = 0; t < n; ++t) {
        const float* vrow = krow[t] + kv_half;
        __m512 vv[DV];
        for (int v = 0; v < DV; ++v) vv[v] = _mm512_loadu_ps(vrow + 16 * v);
        for (int64_t g = 0; g < G; ++g) {
          const __m512 pt = _mm512_set1_ps(p[g][t]);
          for (int v = 0; v < DV; ++v) acc[g][v] = _mm512_fmadd_ps(pt, vv[v], acc[g][v]);
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const __m512 inv = _mm512_set1_ps(l[g] > 0.f ? 1.f / l[g] : 0.f);
      float* orow = op + (hq0 + g0 + g) * os1;
      for (int v = 0; v < DV; ++v) _mm512_storeu_ps(orow + 16 * v, _mm512_mul_ps(acc[g][v], inv));
    }
  }
}

#endif

#if PDSERVE_ATTN_SIMD == 2
#ifndef PDSERVE_DECODE_PREFETCH
#define PDSERVE_DECODE_PREFETCH 16
#endif
// float32 on AVX2 + FMA machines (no AVX-512, e.g. AMD Zen 3), head_dim a multiple of 8 up to
// 256: decode_item_f32's pass with 8-lane vectors. The scalar loops above cost 2-3x this on such
// a machine (libm's exp per score, a reduction per dot product; docs/benchmarks.md, session 8).
// Work items and per-head arithmetic as in the AVX-512 kernel: a query head's output does not
// depend on the split or the batch. Per chunk of 8 tokens: scores, online softmax over the 8
// lanes with SLEEF's exp, then acc += p[t] * V[t].
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

template <int DV>
void decode_item_f32(const float* qp, int64_t qs1, const float* kvp, const int64_t* tab, int64_t len,
                          int64_t ps, int64_t page_stride, int64_t layer_off, int64_t kv_half, int64_t tok_stride,
                          int64_t h, int64_t D, int64_t hq0, int64_t ng, float sc, float* op, int64_t os1) {
  constexpr int kMaxG = 4;  // fewer heads per pass than AVX-512: 16 vector registers, not 32
  constexpr int64_t kPrefetch = PDSERVE_DECODE_PREFETCH;  // tokens ahead
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t g0 = 0; g0 < ng; g0 += kMaxG) {
    const int64_t G = std::min<int64_t>(kMaxG, ng - g0);
    __m256 qv[kMaxG][DV], acc[kMaxG][DV];
    float m[kMaxG], l[kMaxG];
    alignas(32) float p[kMaxG][8];
    for (int64_t g = 0; g < G; ++g) {
      const float* qrow = qp + (hq0 + g0 + g) * qs1;
      for (int v = 0; v < DV; ++v) {
        qv[g][v] = _mm256_mul_ps(_mm256_loadu_ps(qrow + 8 * v), _mm256_set1_ps(sc));
        acc[g][v] = _mm256_setzero_ps();
      }
      m[g] = neg_inf;
      l[g] = 0.f;
    }
    for (int64_t start = 0; start < len; start += 8) {
      // 8 tokens (or fewer at the end); a chunk may span pages
      const int64_t n = std::min<int64_t>(8, len - start);
      const __m256 valid = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane));
      const float* krow[8];
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = start + t;
        krow[t] = kvp + tab[pos / ps] * page_stride + layer_off + (pos % ps) * tok_stride + h * D;
      }
      // prefetch the K and V rows two chunks ahead: a request's pages lie anywhere in the pool,
      // and in batched decode this kernel waits on memory, not arithmetic (docs/benchmarks.md,
      // session 8: 32 requests x 320 tokens 1.8 -> 0.8 ms a layer on AMD EPYC)
      for (int64_t pos = start + kPrefetch, e = std::min(len, pos + 8); pos < e; ++pos) {
        const char* k = reinterpret_cast<const char*>(kvp + tab[pos / ps] * page_stride + layer_off +
                                                      (pos % ps) * tok_stride + h * D);
        for (int64_t off = 0; off < D * 4; off += 64) {
          _mm_prefetch(k + off, _MM_HINT_T0);
          _mm_prefetch(k + kv_half * 4 + off, _MM_HINT_T0);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        alignas(32) float s[8];
        for (int64_t t = 0; t < n; ++t) {
          // two chains over the head's vectors (D/8 dependent FMAs would stall on latency)
          __m256 d0 = _mm256_mul_ps(qv[g][0], _mm256_loadu_ps(krow[t]));
          __m256 d1 = DV > 1 ? _mm256_mul_ps(qv[g][1], _mm256_loadu_ps(krow[t] + 8)) : _mm256_setzero_ps();
          for (int v = 2; v + 1 < DV; v += 2) {
            d0 = _mm256_fmadd_ps(qv[g][v], _mm256_loadu_ps(krow[t] + 8 * v), d0);
            d1 = _mm256_fmadd_ps(qv[g][v + 1], _mm256_loadu_ps(krow[t] + 8 * v + 8), d1);
          }
          if (DV > 1 && DV % 2 == 1) d0 = _mm256_fmadd_ps(qv[g][DV - 1], _mm256_loadu_ps(krow[t] + 8 * (DV - 1)), d0);
          s[t] = hsum8(_mm256_add_ps(d0, d1));
        }
        for (int64_t t = n; t < 8; ++t) s[t] = neg_inf;
        const __m256 sv = _mm256_load_ps(s);
        const float mx = std::max(m[g], hmax8(sv));
        const __m256 pv = _mm256_and_ps(valid, Sleef_expf8_u10(_mm256_sub_ps(sv, _mm256_set1_ps(mx))));
        _mm256_store_ps(p[g], pv);
        const float sum = hsum8(pv);
        if (m[g] != mx) {
          const float corr = m[g] == neg_inf ? 0.f : std::exp(m[g] - mx);
          const __m256 cv = _mm256_set1_ps(corr);
          for (int v = 0; v < DV; ++v) acc[g][v] = _mm256_mul_ps(acc[g][v], cv);
          l[g] *= corr;
          m[g] = mx;
        }
        l[g] += sum;
      }
      for (int64_t t = 0; t < n; ++t) {
        const float* vrow = krow[t] + kv_half;
        for (int64_t g = 0; g < G; ++g) {
          const __m256 pt = _mm256_set1_ps(p[g][t]);
          for (int v = 0; v < DV; ++v) acc[g][v] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vrow + 8 * v), acc[g][v]);
        }
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const __m256 inv = _mm256_set1_ps(l[g] > 0.f ? 1.f / l[g] : 0.f);
      float* orow = op + (hq0 + g0 + g) * os1;
      for (int v = 0; v < DV; ++v) _mm256_storeu_ps(orow + 8 * v, _mm256_mul_ps(acc[g][v], inv));
    }
  }
}

#endif

#if PDSERVE_ATTN_SIMD
// either width: decode_item_f32 is the AVX-512 or the AVX2 form above
template <int DV>
void paged_decode_f32(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& table, const at::Tensor& lens,
                      int64_t layer, double scale, at::Tensor& out) {
  const PagedGeometry g(q, kv, table, out, layer);
  const float* kvp = kv.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t* tp = table.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  // few (request, KV head) pairs for the threads (single-stream decode): one item per query
  // head instead, so the threads share the work evenly
  const int64_t split = g.B * g.Hkv < 2 * at::get_num_threads() ? g.G : 1;
  const int64_t per = g.G / split;
  at::parallel_for(0, g.B * g.Hkv * split, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / (g.Hkv * split), h = (w / split) % g.Hkv, part = w % split;
      decode_item_f32<DV>(qp + b * g.qs0, g.qs1, kvp, tp + b * g.npg, lp[b], g.ps, g.page_stride, g.layer_off,
                          g.kv_half, g.tok_stride, h, g.D, h * g.G + part * per, per, static_cast<float>(scale),
                          op + b * g.os0, g.os1);
    }
  });
}
#endif

void paged_decode(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& table, const at::Tensor& lens,
                  int64_t layer, double scale, at::Tensor out) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && kv.dim() == 6, "paged_decode: q/out [B, Hq, D], kv 6-d");
  TORCH_CHECK(kv.is_contiguous(), "paged_decode: the KV pool must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "paged_decode: head_dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type() && out.scalar_type() == kv.scalar_type(),
              "paged_decode: q, kv and out must share a dtype");
  TORCH_CHECK(table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong &&
                  table.is_contiguous() && lens.is_contiguous(),
              "paged_decode: table and lens must be contiguous int64");
  TORCH_CHECK(q.size(2) == kv.size(5) && q.size(1) % kv.size(4) == 0, "paged_decode: head shapes differ");
  TORCH_CHECK(table.size(0) == q.size(0) && lens.size(0) == q.size(0), "paged_decode: one table row per query");
  TORCH_CHECK(layer >= 0 && layer < kv.size(1), "paged_decode: layer out of range");
#if PDSERVE_ATTN_SIMD == 1
  if (kv.scalar_type() == at::kFloat) {
    switch (q.size(2)) {
      case 16: return paged_decode_f32<1>(q, kv, table, lens, layer, scale, out);
      case 32: return paged_decode_f32<2>(q, kv, table, lens, layer, scale, out);
      case 64: return paged_decode_f32<4>(q, kv, table, lens, layer, scale, out);
      case 128: return paged_decode_f32<8>(q, kv, table, lens, layer, scale, out);
      case 256: return paged_decode_f32<16>(q, kv, table, lens, layer, scale, out);
      default: break;
    }
  }
#elif PDSERVE_ATTN_SIMD == 2
  if (kv.scalar_type() == at::kFloat) {
    switch (q.size(2)) {
      case 16: return paged_decode_f32<2>(q, kv, table, lens, layer, scale, out);
      case 32: return paged_decode_f32<4>(q, kv, table, lens, layer, scale, out);
      case 64: return paged_decode_f32<8>(q, kv, table, lens, layer, scale, out);
      case 128: return paged_decode_f32<16>(q, kv, table, lens, layer, scale, out);
      case 256: return paged_decode_f32<32>(q, kv, table, lens, layer, scale, out);
      default: break;
    }
  }
#endif
  if (kv.scalar_type() == at::kFloat) {
    paged_decode_impl<float>(q, kv, table, lens, layer, scale, out);
  } else if (kv.scalar_type() == at::kBFloat16) {
    paged_decode_impl<at::BFloat16>(q, kv, table, lens, layer, scale, out);
  } else {
    TORCH_CHECK(false, "paged_decode: float32 or bfloat16 only");
  }
}

// A decode-only step in one call: write each request's new K and V row of this layer into the
// pool (rows[write_rows[b] + layer * 2 * page_size] and + page_size, the row view of
// TorchNativeAttention), then paged_decode. Saves the two index_copy_ calls, their index
// arithmetic and the output allocation of every layer (issue #12: per-layer overhead).
at::Tensor paged_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor kv,
                             const at::Tensor& write_rows, const at::Tensor& table, const at::Tensor& lens,
                             int64_t layer, double scale) {
  TORCH_CHECK(kv.dim() == 6 && kv.is_contiguous(), "paged_decode_step: the KV pool must be contiguous and 6-d");
  const int64_t B = q.size(0), ps = kv.size(3), Hkv = kv.size(4), D = kv.size(5);
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.size(0) == B && v.size(0) == B && k.size(1) == Hkv &&
                  v.size(1) == Hkv && k.size(2) == D && v.size(2) == D && k.stride(2) == 1 && v.stride(2) == 1 &&
                  k.stride(1) == D && v.stride(1) == D,
              "paged_decode_step: k and v must be [B, Hkv, D] with contiguous rows");
  TORCH_CHECK(k.scalar_type() == kv.scalar_type() && v.scalar_type() == kv.scalar_type(),
              "paged_decode_step: k, v and the pool must share a dtype");
  TORCH_CHECK(write_rows.scalar_type() == at::kLong && write_rows.is_contiguous() && write_rows.numel() == B,
              "paged_decode_step: write_rows must be contiguous int64 [B]");
  TORCH_CHECK(layer >= 0 && layer < kv.size(1), "paged_decode_step: layer out of range");
  const int64_t row = Hkv * D, rows_total = kv.numel() / row, lrow = layer * 2 * ps;
  const int64_t* wr = write_rows.data_ptr<int64_t>();
  const int64_t es = kv.element_size();
  char* base = static_cast<char*>(kv.data_ptr());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = wr[b] + lrow;
    TORCH_CHECK(r >= 0 && r + ps < rows_total, "paged_decode_step: write row out of range");
    std::memcpy(base + r * row * es, kp + b * k.stride(0) * es, row * es);
    std::memcpy(base + (r + ps) * row * es, vp + b * v.stride(0) * es, row * es);
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  paged_decode(q, kv, table, lens, layer, scale, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(pdserve_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor kv, Tensor table, Tensor lens, int layer, float scale, Tensor(a!) out) -> ()");
  m.def(
      "paged_decode_step(Tensor q, Tensor k, Tensor v, Tensor(a!) kv, Tensor write_rows, Tensor table, Tensor lens, "
      "int layer, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("paged_decode_step", &paged_decode_step);
}
