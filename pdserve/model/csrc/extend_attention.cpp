// Prefill (extend) attention that reads pdserve's paged KV pool in place (issue #12).
//
// One call per layer for every prefill chunk of a step. Chunk s holds q_len[s] query tokens at
// rows q_start[s].. of q [T, Hq, D]; its context is prefix_len[s] + q_len[s] tokens, token i at
// page table[s][i / page_size], offset i % page_size of the pool (the chunk's own K/V rows are
// written there before the call). Query token j (position prefix_len + j) attends causally to
// context tokens 0..prefix_len + j.
//
// Work item: (chunk, KV head h, block of QB query tokens). Its rows are the QB tokens times the
// G = Hq / Hkv query heads of the group (row r = token (r / G), head h * G + r % G), so every K
// and V row load serves all of them. The queries are held transposed (Qt[d][r]), so scores come
// out transposed as well, ST[key][r]: a key's scores for 16 rows are one AVX-512 vector (8 rows
// one AVX2 vector), built by broadcasting K[key][d] against Qt[d][16 rows]. The online softmax (running max, sum, rescale)
// is then lane-wise over rows, without horizontal reductions; masking (causal and the block's
// tail) is a compare of each row's position with the key's. Output rows accumulate
// P[key][r] * V[key] with 4 rows x D/16 vectors in registers (AVX2: 4 rows x 16 columns).
//
// A row's arithmetic (the order of its sums) depends only on its own position and the keys, not
// on which chunks or decode requests share the step. Items are taken by the threads from one
// counter, longest first (causal items differ in length by up to the chunk's size).
//
// Registered as torch.ops.pdserve_cpu.paged_extend(q, kv, tables, meta, layer, scale, out);
// meta [S, 3] int64 = (q_start, q_len, prefix_len). float32, head_dim 16, 32, 64 or 128, with
// AVX-512 or (session 8, e.g. AMD Zen 3) AVX2 + FMA; pdserve/model/attention_backends.py runs
// SDPA elsewhere (paged_extend_supported says which).

#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
extern "C" __m512 Sleef_expf16_u10(__m512);
#define PDSERVE_EXTEND_SIMD 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
// SLEEF's 8-lane exp, exported by libtorch_cpu (torch's AVX2 Vectorized<float>::exp)
extern "C" __m256 Sleef_expf8_u10(__m256);
#define PDSERVE_EXTEND_SIMD 2
#else
#define PDSERVE_EXTEND_SIMD 0
#endif

namespace {

#if PDSERVE_EXTEND_SIMD

constexpr int64_t QB = 16;  // query tokens per work item
constexpr int KB = 16;      // keys per block
#if PDSERVE_EXTEND_SIMD == 1
constexpr int kLanes = 16;  // floats per vector
constexpr int NK = 8;       // keys per score micro-kernel call
#else
constexpr int kLanes = 8;
#endif

struct ExtendGeometry {
  int64_t Hq, D, Hkv, G, ps, npg;
  int64_t qs0, qs1, os0, os1;
  int64_t tok_stride, kv_half, page_stride, layer_off;
  ExtendGeometry(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables, const at::Tensor& out,
                 int64_t layer)
      : Hq(q.size(1)), D(q.size(2)), Hkv(kv.size(4)), G(Hq / Hkv), ps(kv.size(3)), npg(tables.size(1)),
        qs0(q.stride(0)), qs1(q.stride(1)), os0(out.stride(0)), os1(out.stride(1)), tok_stride(Hkv * D),
        kv_half(ps * Hkv * D), page_stride(kv.size(1) * 2 * kv_half), layer_off(layer * 2 * kv_half) {}
};

struct Item {
  int64_t s, h, t0, t1, keys;  // chunk, KV head, query tokens [t0, t1) of the chunk, context keys it reads
};

// One work item's scratch, carved out of `buf` (the same layout for either vector width): its
// query rows transposed and scaled, padded to a multiple of kLanes rows that no key mask hits.
struct ItemScratch {
  int64_t M, Mp, nrb;  // rows (tokens x query heads of the group), padded rows, row blocks
  float* Qt;           // [D][Mp], scaled
  float* st;           // [KB][Mp]: scores, then probabilities
  float* acc;          // [Mp][D]
  float* mrow;         // running max per row
  float* lrow;         // running sum
  float* corr;         // this block's rescale factor
  int32_t* pos;        // each row's position (padding: never masked)
  float* zero;         // a zero K row for keys past the end of a score block
};

inline ItemScratch prepare_item(const ExtendGeometry& g, const Item& it, const float* qp, int64_t q_start,
                                int64_t prefix, float sc, int64_t D, std::vector<float>& buf) {
  ItemScratch x;
  x.M = (it.t1 - it.t0) * g.G;
  x.Mp = (x.M + kLanes - 1) / kLanes * kLanes;
  x.nrb = x.Mp / kLanes;
  const int64_t Mp = x.Mp;
  buf.resize(static_cast<size_t>(D * Mp + KB * Mp + Mp * D + 4 * Mp + D));
  x.Qt = buf.data();
  x.st = x.Qt + D * Mp;
  x.acc = x.st + KB * Mp;
  x.mrow = x.acc + Mp * D;
  x.lrow = x.mrow + Mp;
  x.corr = x.lrow + Mp;
  x.pos = reinterpret_cast<int32_t*>(x.corr + Mp);
  x.zero = x.corr + 2 * Mp;
  std::fill(x.zero, x.zero + D, 0.f);
  for (int64_t r = 0; r < Mp; ++r) {
    const bool real = r < x.M;
    const int64_t t = it.t0 + r / g.G, hq = it.h * g.G + r % g.G;
    const float* qrow = qp + (q_start + t) * g.qs0 + hq * g.qs1;
    for (int64_t d = 0; d < D; ++d) x.Qt[d * Mp + r] = real ? qrow[d] * sc : 0.f;
    x.pos[r] = real ? static_cast<int32_t>(prefix + t) : std::numeric_limits<int32_t>::max();
    x.mrow[r] = -std::numeric_limits<float>::infinity();
    x.lrow[r] = 0.f;
  }
  std::fill(x.acc, x.acc + Mp * D, 0.f);
  return x;
}

// The K and V rows of keys k0 .. k0 + KB - 1 in the paged pool (keys past the item's last:
// the zero K row, the last key's V row); returns how many keys are real.
inline int64_t key_rows(const ExtendGeometry& g, const Item& it, const float* kvp, const int64_t* tab, int64_t k0,
                        int64_t D, const float* zero, const float** krow, const float** vrow) {
  const int64_t n = std::min<int64_t>(KB, it.keys - k0);
  for (int64_t t = 0; t < KB; ++t) {
    const int64_t p = k0 + std::min(t, n - 1);
    krow[t] = kvp + tab[p / g.ps] * g.page_stride + g.layer_off + (p % g.ps) * g.tok_stride + it.h * D;
    vrow[t] = krow[t] + g.kv_half;
    if (t >= n) krow[t] = zero;
  }
  return n;
}

#if PDSERVE_EXTEND_SIMD == 1
// ST[t][rows rb0*16 ..] for NK keys (rows of K given by krow) and NR blocks of 16 rows.
template <int NR>
inline void score_keys(const float* Qt, int64_t Mp, int64_t D, const float* const* krow, int64_t rb0, float* st) {
  __m512 acc[NK][NR];
  for (int j = 0; j < NK; ++j)
    for (int r = 0; r < NR; ++r) acc[j][r] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 qv[NR];
    for (int r = 0; r < NR; ++r) qv[r] = _mm512_loadu_ps(Qt + d * Mp + (rb0 + r) * 16);
    for (int j = 0; j < NK; ++j) {
      const __m512 kb = _mm512_set1_ps(krow[j][d]);
      for (int r = 0; r < NR; ++r) acc[j][r] = _mm512_fmadd_ps(qv[r], kb, acc[j][r]);
    }
  }
  for (int j = 0; j < NK; ++j)
    for (int r = 0; r < NR; ++r) _mm512_storeu_ps(st + j * Mp + (rb0 + r) * 16, acc[j][r]);
}

// acc[r] = acc[r] * corr[r] + sum_t P[t][r] * V[t] for rows r0..r0+3.
template <int DV>
inline void accumulate_rows(float* acc, const float* corr, const float* st, int64_t Mp, const float* const* vrow,
                            int64_t n, int64_t r0) {
  __m512 o[4][DV];
  for (int i = 0; i < 4; ++i) {
    const __m512 c = _mm512_set1_ps(corr[r0 + i]);
    for (int v = 0; v < DV; ++v) o[i][v] = _mm512_mul_ps(_mm512_loadu_ps(acc + (r0 + i) * DV * 16 + 16 * v), c);
  }
  for (int64_t t = 0; t < n; ++t) {
    __m512 vv[DV];
    for (int v = 0; v < DV; ++v) vv[v] = _mm512_loadu_ps(vrow[t] + 16 * v);
    for (int i = 0; i < 4; ++i) {
      const __m512 p = _mm512_set1_ps(st[t * Mp + r0 + i]);
      for (int v = 0; v < DV; ++v) o[i][v] = _mm512_fmadd_ps(p, vv[v], o[i][v]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < DV; ++v) _mm512_storeu_ps(acc + (r0 + i) * DV * 16 + 16 * v, o[i][v]);
}

template <int DV>
void extend_item(const ExtendGeometry& g, const Item& it, const float* qp, const float* kvp, const int64_t* tab,
                 int64_t q_start, int64_t prefix, float sc, float* op, std::vector<float>& buf) {
  constexpr int64_t D = DV * 16;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const ItemScratch x = prepare_item(g, it, qp, q_start, prefix, sc, D, buf);
  const int64_t G = g.G, M = x.M, Mp = x.Mp, nrb = x.nrb;
  float *const st = x.st, *const acc = x.acc, *const mrow = x.mrow, *const lrow = x.lrow, *const corr = x.corr;
  const float* const Qt = x.Qt;
  const int32_t* const pos = x.pos;
  const int64_t first_masked = prefix + it.t0 + 1;  // keys from here on are masked for some row
  const float* krow[KB];
  const float* vrow[KB];
  for (int64_t k0 = 0; k0 < it.keys; k0 += KB) {
    const int64_t n = key_rows(g, it, kvp, tab, k0, D, x.zero, krow, vrow);
    for (int64_t j = 0; j < KB; j += NK) {
      // three blocks of 16 rows per call where there are (24 accumulators, 3 loads + 8
      // broadcasts per 24 FMAs), then pairs, then one
      int64_t rb = 0;
      for (; rb + 3 <= nrb; rb += 3) score_keys<3>(Qt, Mp, D, krow + j, rb, st + j * Mp);
      if (rb + 2 <= nrb) {
        score_keys<2>(Qt, Mp, D, krow + j, rb, st + j * Mp);
        rb += 2;
      }
      if (rb < nrb) score_keys<1>(Qt, Mp, D, krow + j, rb, st + j * Mp);
    }
    const bool masked = k0 + KB > first_masked;
    for (int64_t rb = 0; rb < nrb; ++rb) {
      const __m512i pv = _mm512_loadu_si512(pos + rb * 16);
      __m512 sv[KB];
      __m512 mx = _mm512_loadu_ps(mrow + rb * 16);
      const __m512 m_old = mx;
      for (int64_t t = 0; t < KB; ++t) {
        sv[t] = _mm512_loadu_ps(st + t * Mp + rb * 16);
        if (t >= n) {
          sv[t] = _mm512_set1_ps(neg_inf);
        } else if (masked) {
          const __mmask16 late = _mm512_cmplt_epi32_mask(pv, _mm512_set1_epi32(static_cast<int32_t>(k0 + t)));
          sv[t] = _mm512_mask_mov_ps(sv[t], late, _mm512_set1_ps(neg_inf));
        }
        mx = _mm512_max_ps(mx, sv[t]);
      }
      // every row sees key 0 in the first block, so mx is finite from then on
      const __m512 c = Sleef_expf16_u10(_mm512_sub_ps(m_old, mx));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const __m512 p = Sleef_expf16_u10(_mm512_sub_ps(sv[t], mx));
        sum = _mm512_add_ps(sum, p);
        _mm512_storeu_ps(st + t * Mp + rb * 16, p);
      }
      _mm512_storeu_ps(lrow + rb * 16, _mm512_fmadd_ps(_mm512_loadu_ps(lrow + rb * 16), c, sum));
      _mm512_storeu_ps(mrow + rb * 16, mx);
      _mm512_storeu_ps(corr + rb * 16, c);
    }
    for (int64_t r0 = 0; r0 < Mp; r0 += 4) accumulate_rows<DV>(acc, corr, st, Mp, vrow, n, r0);
  }
  for (int64_t r = 0; r < M; ++r) {
    const int64_t t = it.t0 + r / G, hq = it.h * G + r % G;
    float* orow = op + (q_start + t) * g.os0 + hq * g.os1;
    const __m512 inv = _mm512_set1_ps(1.f / lrow[r]);
    for (int v = 0; v < DV; ++v) _mm512_storeu_ps(orow + 16 * v, _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + 16 * v), inv));
  }
}

#endif  // PDSERVE_EXTEND_SIMD == 1

#if PDSERVE_EXTEND_SIMD == 2
// The same work items, row layout and online softmax on AVX2 + FMA (no AVX-512, e.g. AMD Zen 3),
// with 8-row vectors: without it such a machine ran prefill through SDPA over a gathered copy
// of the context (docs/benchmarks.md, session 8). Register blocking is sized for 16 vector
// registers: 4 keys x 3 row blocks of scores, 4 rows x 16 columns of output per call.

constexpr int NK = 4;  // keys per score micro-kernel call

// ST[t][rows rb0*8 ..] for NK keys (rows of K given by krow) and NR blocks of 8 rows.
template <int NR>
inline void score_keys(const float* Qt, int64_t Mp, int64_t D, const float* const* krow, int64_t rb0, float* st) {
  __m256 acc[NK][NR];
  for (int j = 0; j < NK; ++j)
    for (int r = 0; r < NR; ++r) acc[j][r] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m256 qv[NR];
    for (int r = 0; r < NR; ++r) qv[r] = _mm256_loadu_ps(Qt + d * Mp + (rb0 + r) * 8);
    for (int j = 0; j < NK; ++j) {
      const __m256 kb = _mm256_broadcast_ss(krow[j] + d);
      for (int r = 0; r < NR; ++r) acc[j][r] = _mm256_fmadd_ps(qv[r], kb, acc[j][r]);
    }
  }
  for (int j = 0; j < NK; ++j)
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(st + j * Mp + (rb0 + r) * 8, acc[j][r]);
}

// acc[r][c0 .. c0+16) = acc[r][..] * corr[r] + sum_t P[t][r] * V[t][c0 .. c0+16) for rows r0..r0+3.
inline void accumulate_rows(float* acc, int64_t D, const float* corr, const float* st, int64_t Mp,
                            const float* const* vrow, int64_t n, int64_t r0, int64_t c0) {
  __m256 o[4][2];
  for (int i = 0; i < 4; ++i) {
    const __m256 c = _mm256_set1_ps(corr[r0 + i]);
    for (int v = 0; v < 2; ++v) o[i][v] = _mm256_mul_ps(_mm256_loadu_ps(acc + (r0 + i) * D + c0 + 8 * v), c);
  }
  for (int64_t t = 0; t < n; ++t) {
    const __m256 v0 = _mm256_loadu_ps(vrow[t] + c0), v1 = _mm256_loadu_ps(vrow[t] + c0 + 8);
    for (int i = 0; i < 4; ++i) {
      const __m256 p = _mm256_broadcast_ss(st + t * Mp + r0 + i);
      o[i][0] = _mm256_fmadd_ps(p, v0, o[i][0]);
      o[i][1] = _mm256_fmadd_ps(p, v1, o[i][1]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int v = 0; v < 2; ++v) _mm256_storeu_ps(acc + (r0 + i) * D + c0 + 8 * v, o[i][v]);
}

template <int DV>
void extend_item(const ExtendGeometry& g, const Item& it, const float* qp, const float* kvp, const int64_t* tab,
                 int64_t q_start, int64_t prefix, float sc, float* op, std::vector<float>& buf) {
  constexpr int64_t D = DV * 8;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const ItemScratch x = prepare_item(g, it, qp, q_start, prefix, sc, D, buf);
  const int64_t G = g.G, M = x.M, Mp = x.Mp, nrb = x.nrb;
  float *const st = x.st, *const acc = x.acc, *const mrow = x.mrow, *const lrow = x.lrow, *const corr = x.corr;
  const float* const Qt = x.Qt;
  const int32_t* const pos = x.pos;
  const int64_t first_masked = prefix + it.t0 + 1;  // keys from here on are masked for some row
  const float* krow[KB];
  const float* vrow[KB];
  for (int64_t k0 = 0; k0 < it.keys; k0 += KB) {
    const int64_t n = key_rows(g, it, kvp, tab, k0, D, x.zero, krow, vrow);
    for (int64_t j = 0; j < KB; j += NK) {
      int64_t rb = 0;
      for (; rb + 3 <= nrb; rb += 3) score_keys<3>(Qt, Mp, D, krow + j, rb, st + j * Mp);
      if (rb + 2 <= nrb) {
        score_keys<2>(Qt, Mp, D, krow + j, rb, st + j * Mp);
        rb += 2;
      }
      if (rb < nrb) score_keys<1>(Qt, Mp, D, krow + j, rb, st + j * Mp);
    }
    const bool masked = k0 + KB > first_masked;
    for (int64_t rb = 0; rb < nrb; ++rb) {
      const __m256i pv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + rb * 8));
      __m256 sv[KB];
      __m256 mx = _mm256_loadu_ps(mrow + rb * 8);
      const __m256 m_old = mx;
      for (int64_t t = 0; t < KB; ++t) {
        sv[t] = _mm256_loadu_ps(st + t * Mp + rb * 8);
        if (t >= n) {
          sv[t] = _mm256_set1_ps(neg_inf);
        } else if (masked) {  // rows whose position is before the key
          const __m256i late = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(k0 + t)), pv);
          sv[t] = _mm256_blendv_ps(sv[t], _mm256_set1_ps(neg_inf), _mm256_castsi256_ps(late));
        }
        mx = _mm256_max_ps(mx, sv[t]);
      }
      // every row sees key 0 in the first block, so mx is finite from then on
      const __m256 c = Sleef_expf8_u10(_mm256_sub_ps(m_old, mx));
      __m256 sum = _mm256_setzero_ps();
      for (int64_t t = 0; t < n; ++t) {
        const __m256 p = Sleef_expf8_u10(_mm256_sub_ps(sv[t], mx));
        sum = _mm256_add_ps(sum, p);
        _mm256_storeu_ps(st + t * Mp + rb * 8, p);
      }
      _mm256_storeu_ps(lrow + rb * 8, _mm256_fmadd_ps(_mm256_loadu_ps(lrow + rb * 8), c, sum));
      _mm256_storeu_ps(mrow + rb * 8, mx);
      _mm256_storeu_ps(corr + rb * 8, c);
    }
    for (int64_t r0 = 0; r0 < Mp; r0 += 4)
      for (int64_t c0 = 0; c0 < D; c0 += 16) accumulate_rows(acc, D, corr, st, Mp, vrow, n, r0, c0);
  }
  for (int64_t r = 0; r < M; ++r) {
    const int64_t t = it.t0 + r / G, hq = it.h * G + r % G;
    float* orow = op + (q_start + t) * g.os0 + hq * g.os1;
    const __m256 inv = _mm256_set1_ps(1.f / lrow[r]);
    for (int v = 0; v < DV; ++v) _mm256_storeu_ps(orow + 8 * v, _mm256_mul_ps(_mm256_loadu_ps(acc + r * D + 8 * v), inv));
  }
}
#endif  // PDSERVE_EXTEND_SIMD == 2

template <int DV>
void paged_extend_f32(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables, const at::Tensor& meta,
                      int64_t layer, double scale, at::Tensor& out) {
  const ExtendGeometry g(q, kv, tables, out, layer);
  const int64_t S = meta.size(0);
  const int64_t* mp = meta.data_ptr<int64_t>();
  std::vector<Item> items;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t q_len = mp[s * 3 + 1], prefix = mp[s * 3 + 2];
    for (int64_t t0 = 0; t0 < q_len; t0 += QB) {
      const int64_t t1 = std::min(q_len, t0 + QB);
      for (int64_t h = 0; h < g.Hkv; ++h) items.push_back({s, h, t0, t1, prefix + t1});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    return a.keys * (a.t1 - a.t0) > b.keys * (b.t1 - b.t0);
  });
  const float* qp = q.data_ptr<float>();
  const float* kvp = kv.data_ptr<float>();
  const int64_t* tp = tables.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n_items);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> buf;
    for (int64_t w = next++; w < n_items; w = next++) {
      const Item& it = items[w];
      extend_item<DV>(g, it, qp, kvp, tp + it.s * g.npg, mp[it.s * 3], mp[it.s * 3 + 2], sc, op, buf);
    }
  });
}

#endif

bool paged_extend_supported(int64_t head_dim) {
#if PDSERVE_EXTEND_SIMD
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128;
#else
  (void)head_dim;
  return false;
#endif
}

void paged_extend(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& tables, const at::Tensor& meta,
                  int64_t layer, double scale, at::Tensor out) {
  TORCH_CHECK(q.dim() == 3 && out.dim() == 3 && kv.dim() == 6, "paged_extend: q/out [T, Hq, D], kv 6-d");
  TORCH_CHECK(kv.is_contiguous(), "paged_extend: the KV pool must be contiguous");
  TORCH_CHECK(q.stride(2) == 1 && out.stride(2) == 1, "paged_extend: head_dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == at::kFloat && kv.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "paged_extend: float32 only");
  TORCH_CHECK(q.size(2) == kv.size(5) && q.size(1) % kv.size(4) == 0 && out.sizes() == q.sizes(),
              "paged_extend: head shapes differ");
  TORCH_CHECK(tables.scalar_type() == at::kLong && meta.scalar_type() == at::kLong && tables.is_contiguous() &&
                  meta.is_contiguous() && tables.dim() == 2 && meta.dim() == 2 && meta.size(1) == 3 &&
                  tables.size(0) == meta.size(0),
              "paged_extend: tables [S, pages] and meta [S, 3] must be contiguous int64");
  TORCH_CHECK(layer >= 0 && layer < kv.size(1), "paged_extend: layer out of range");
  TORCH_CHECK(paged_extend_supported(q.size(2)), "paged_extend: head_dim 16, 32, 64 or 128 with AVX-512 or AVX2 only");
  const int64_t* mp = meta.data_ptr<int64_t>();
  const int64_t ps = kv.size(3), pages = kv.size(0), npg = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  for (int64_t s = 0; s < meta.size(0); ++s) {
    const int64_t q_start = mp[s * 3], q_len = mp[s * 3 + 1], prefix = mp[s * 3 + 2];
    TORCH_CHECK(q_start >= 0 && q_len >= 0 && prefix >= 0 && q_start + q_len <= q.size(0),
                "paged_extend: chunk rows out of range");
    const int64_t used = (prefix + q_len + ps - 1) / ps;
    TORCH_CHECK(used <= npg, "paged_extend: a chunk's context needs more pages than its table row has");
    for (int64_t i = 0; i < used; ++i)
      TORCH_CHECK(tp[s * npg + i] >= 0 && tp[s * npg + i] < pages, "paged_extend: page index out of range");
  }
#if PDSERVE_EXTEND_SIMD
  switch (q.size(2)) {  // template argument: vectors per head row
    case 16: return paged_extend_f32<16 / kLanes>(q, kv, tables, meta, layer, scale, out);
    case 32: return paged_extend_f32<32 / kLanes>(q, kv, tables, meta, layer, scale, out);
    case 64: return paged_extend_f32<64 / kLanes>(q, kv, tables, meta, layer, scale, out);
    case 128: return paged_extend_f32<128 / kLanes>(q, kv, tables, meta, layer, scale, out);
    default: break;
  }
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("paged_extend(Tensor q, Tensor kv, Tensor tables, Tensor meta, int layer, float scale, Tensor(a!) out) -> ()");
  m.def("paged_extend_supported(int head_dim) -> bool", &paged_extend_supported);
}

TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) { m.impl("paged_extend", &paged_extend); }
