// Paged decode attention on CPU: one query token per sequence, GQA, read in place.
//
// Semantics = pdmesh.runtime.cpu_attention.paged_decode_attention_ref: scale * q.k scores,
// head h reads kv head h / (H / Hkv), sequence b sees its first lens[b] tokens, found at
// (table[b][pos / page], pos % page) of the pool. K/V are read straight from the pool
// (no gather), each K/V row once per kv head for the g query heads that share it.
// Scores, softmax (online, per block of <= 16 tokens within a page) and the output
// accumulate in fp32; the output is rounded to the input dtype once, at the end.
// Work: one task per (sequence, kv head), split over torch's intra-op threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kBlock = 16;  // tokens per softmax block: one zmm of scores

// ---- fp32 row helpers: AVX-512 over 16 lanes, scalar tail / fallback ----

inline void to_float(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {  // bf16 -> fp32 is a 16-bit left shift
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(w));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float* acc, float p, const float* v, int64_t n) {  // acc += p * v
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + i),
                                              _mm512_loadu_ps(acc + i)));
#endif
  for (; i < n; ++i) acc[i] += p * v[i];
}

inline void scale_row(float* acc, float a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] *= a;
}

#if defined(__AVX512F__)
// exp on 16 lanes (Cephes expf polynomial on |r| <= ln2/2, then * 2^n): ~1 ulp
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// s[0..n) := exp(s - m) in place; returns their sum (n <= kBlock)
inline float exp_block(float* s, int n, float m) {
#if defined(__AVX512F__)
  __mmask16 k = static_cast<__mmask16>((1u << n) - 1u);
  __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s), _mm512_set1_ps(m)));
  e = _mm512_maskz_mov_ps(k, e);
  _mm512_mask_storeu_ps(s, k, e);
  return _mm512_reduce_add_ps(e);
#else
  float sum = 0.f;
  for (int t = 0; t < n; ++t) sum += (s[t] = std::exp(s[t] - m));
  return sum;
#endif
}

struct Shape {
  int64_t heads, kv_heads, group, dim, page, width;
  int64_t qs0, qs1, os0, os1, ks0, ks1, ks2, ks3;  // element strides
};

// One (sequence, kv head): g query heads over lens tokens of paged K/V.
template <typename T>
void attend_one(const T* q, const T* kv, const int64_t* table, int64_t len, T* out,
                const Shape& s, float scale, float* work) {
  const int64_t g = s.group, d = s.dim;
  float* qf = work;                // [g, d] scaled queries
  float* acc = qf + g * d;         // [g, d] unnormalised output
  float* kf = acc + g * d;         // [d] one K or V row in fp32
  float* sc = kf + d;              // [g, kBlock] scores, then probabilities
  float m[64], l[64];              // running max / sum per query head (g <= 64)
  for (int64_t h = 0; h < g; ++h) {
    to_float(q + h * s.qs1, qf + h * d, d);
    scale_row(qf + h * d, scale, d);
    m[h] = -std::numeric_limits<float>::infinity();
    l[h] = 0.f;
  }
  std::fill(acc, acc + g * d, 0.f);
  for (int64_t start = 0; start < len;) {
    const int64_t pos_in_page = start % s.page;
    const int n = static_cast<int>(std::min<int64_t>({kBlock, s.page - pos_in_page, len - start}));
    const T* base = kv + table[start / s.page] * s.ks0 + pos_in_page * s.ks1;
    for (int t = 0; t < n; ++t) {  // scores of this block
      to_float(base + t * s.ks1, kf, d);
      for (int64_t h = 0; h < g; ++h) sc[h * kBlock + t] = dot(qf + h * d, kf, d);
    }
    for (int64_t h = 0; h < g; ++h) {  // online softmax: rescale what came before
      float* sh = sc + h * kBlock;
      const float mnew = std::max(m[h], *std::max_element(sh, sh + n));
      const float alpha = std::exp(m[h] - mnew);  // exp(-inf) = 0 on the first block
      l[h] = l[h] * alpha + exp_block(sh, n, mnew);
      if (alpha != 1.f) scale_row(acc + h * d, alpha, d);
      m[h] = mnew;
    }
    for (int t = 0; t < n; ++t) {  // acc += p * V
      to_float(base + t * s.ks1 + s.ks2, kf, d);
      for (int64_t h = 0; h < g; ++h) axpy(acc + h * d, sc[h * kBlock + t], kf, d);
    }
    start += n;
  }
  for (int64_t h = 0; h < g; ++h) {
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;  // len 0: zeros
    for (int64_t i = 0; i < d; ++i) out[h * s.os1 + i] = static_cast<T>(acc[h * d + i] * inv);
  }
}


#if defined(__AVX512F__)
// ---- fast path: D and G known at compile time, queries and output in registers ----

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// v[0..16): 16 vectors of partial sums -> lane t = sum of v[t]'s lanes (a transposing
// tree of adds: ~3 ops per vector instead of a full horizontal reduction each)
inline __m512 sum_lanes16(__m512* v) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: tokens 4i..4i+3, partial
    __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88),   // lanes (0,2,0,2)
                           _mm512_shuffle_f32x4(x[0], x[1], 0xDD));  // lanes (1,3,1,3)
  __m512 z = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88),
                           _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y, z, 0x88), _mm512_shuffle_f32x4(y, z, 0xDD));
}

// q.k partial sums (16 lanes) of G heads against one K row
template <typename T, int D, int G>
struct QK {
  __m512 q[G][D / 16];  // scaled queries, fp32
  void init(const T* qp, int64_t qs1, float scale) {
    for (int h = 0; h < G; ++h)
      for (int c = 0; c < D / 16; ++c)
        q[h][c] = _mm512_mul_ps(load16(qp + h * qs1 + 16 * c), _mm512_set1_ps(scale));
  }
  void row(const T* k, __m512* part, int t) const {  // part[h * 16 + t]
    __m512 kc[D / 16];
    for (int c = 0; c < D / 16; ++c) kc[c] = load16(k + 16 * c);
    for (int h = 0; h < G; ++h) {
      __m512 a = _mm512_mul_ps(q[h][0], kc[0]);
      for (int c = 1; c < D / 16; ++c) a = _mm512_fmadd_ps(q[h][c], kc[c], a);
      part[h * 16 + t] = a;
    }
  }
};

#if defined(__AVX512BF16__)
// bf16: products of bf16 pairs straight into fp32 (vdpbf16ps), no K conversion;
// the scale is applied to the summed scores instead (q stays exactly as stored)
template <int D, int G>
struct QK<c10::BFloat16, D, G> {
  __m512bh q[G][D / 32];
  float scale;
  void init(const c10::BFloat16* qp, int64_t qs1, float s) {
    scale = s;
    for (int h = 0; h < G; ++h)
      for (int c = 0; c < D / 32; ++c)
        q[h][c] = (__m512bh)_mm512_loadu_si512(qp + h * qs1 + 32 * c);
  }
  void row(const c10::BFloat16* k, __m512* part, int t) const {
    __m512bh kc[D / 32];
    for (int c = 0; c < D / 32; ++c) kc[c] = (__m512bh)_mm512_loadu_si512(k + 32 * c);
    for (int h = 0; h < G; ++h) {
      __m512 a = _mm512_setzero_ps();
      for (int c = 0; c < D / 32; ++c) a = _mm512_dpbf16_ps(a, q[h][c], kc[c]);
      part[h * 16 + t] = _mm512_mul_ps(a, _mm512_set1_ps(scale));
    }
  }
};
#endif

inline void prefetch_rows(const char* p, int64_t rows, int64_t stride, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(p + r * stride + o, _MM_HINT_T0);
}

template <typename T, int D, int G>
void attend_fast(const T* q, const T* kv, const int64_t* table, int64_t len, T* out,
                 const Shape& s, float scale, float*) {
  QK<T, D, G> qk;
  qk.init(q, s.qs1, scale);
  __m512 acc[G][D / 16], part[G * 16];
  alignas(64) float p[G][16];
  float m[G], l[G];
  for (int h = 0; h < G; ++h) {
    for (int c = 0; c < D / 16; ++c) acc[h][c] = _mm512_setzero_ps();
    m[h] = -std::numeric_limits<float>::infinity();
    l[h] = 0.f;
  }
  const int64_t row_bytes = D * sizeof(T), stride_bytes = s.ks1 * sizeof(T);
  for (int64_t start = 0; start < len;) {
    const int64_t in_page = start % s.page, page_i = start / s.page;
    const int n = static_cast<int>(std::min<int64_t>({kBlock, s.page - in_page, len - start}));
    const T* base = kv + table[page_i] * s.ks0 + in_page * s.ks1;
    if (in_page == 0 && (page_i + 1) * s.page < len) {  // next page's K and V rows
      const T* nxt = kv + table[page_i + 1] * s.ks0;
      const int64_t rows = std::min<int64_t>(s.page, len - (page_i + 1) * s.page);
      prefetch_rows(reinterpret_cast<const char*>(nxt), rows, stride_bytes, row_bytes);
      prefetch_rows(reinterpret_cast<const char*>(nxt + s.ks2), rows, stride_bytes, row_bytes);
    }
    for (int t = 0; t < n; ++t) qk.row(base + t * s.ks1, part, t);
    for (int t = n; t < 16; ++t)
      for (int h = 0; h < G; ++h) part[h * 16 + t] = _mm512_setzero_ps();
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
    for (int h = 0; h < G; ++h) {  // online softmax over this block
      __m512 sc = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), sum_lanes16(part + h * 16));
      const float mnew = std::max(m[h], _mm512_reduce_max_ps(sc));
      const float alpha = std::exp(m[h] - mnew);  // 0 on the first block
      __m512 e = _mm512_maskz_mov_ps(valid, exp512(_mm512_sub_ps(sc, _mm512_set1_ps(mnew))));
      l[h] = l[h] * alpha + _mm512_reduce_add_ps(e);
      _mm512_store_ps(p[h], e);
      if (alpha != 1.f)
        for (int c = 0; c < D / 16; ++c) acc[h][c] = _mm512_mul_ps(acc[h][c], _mm512_set1_ps(alpha));
      m[h] = mnew;
    }
    for (int t = 0; t < n; ++t) {  // acc += p * V
      const T* vr = base + t * s.ks1 + s.ks2;
      __m512 vc[D / 16];
      for (int c = 0; c < D / 16; ++c) vc[c] = load16(vr + 16 * c);
      for (int h = 0; h < G; ++h) {
        const __m512 ph = _mm512_set1_ps(p[h][t]);
        for (int c = 0; c < D / 16; ++c) acc[h][c] = _mm512_fmadd_ps(ph, vc[c], acc[h][c]);
      }
    }
    start += n;
  }
  alignas(64) float row[D];
  for (int h = 0; h < G; ++h) {
    const __m512 inv = _mm512_set1_ps(l[h] > 0.f ? 1.f / l[h] : 0.f);
    for (int c = 0; c < D / 16; ++c) _mm512_store_ps(row + 16 * c, _mm512_mul_ps(acc[h][c], inv));
    for (int i = 0; i < D; ++i) out[h * s.os1 + i] = static_cast<T>(row[i]);
  }
}
#endif  // __AVX512F__

template <typename T>
using AttendFn = void (*)(const T*, const T*, const int64_t*, int64_t, T*, const Shape&,
                          float, float*);

// the compiled fast path for (dim, group), else the generic one
template <typename T>
AttendFn<T> pick(int64_t dim, int64_t group) {
#if defined(__AVX512F__)
#define PDMESH_CASE(D, G) if (dim == D && group == G) return &attend_fast<T, D, G>;
  PDMESH_CASE(64, 1) PDMESH_CASE(64, 2) PDMESH_CASE(64, 3) PDMESH_CASE(64, 4)
  PDMESH_CASE(64, 6) PDMESH_CASE(64, 8) PDMESH_CASE(128, 1) PDMESH_CASE(128, 2)
  PDMESH_CASE(128, 4) PDMESH_CASE(128, 8)
#undef PDMESH_CASE
#endif
  return &attend_one<T>;
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& table,
         const at::Tensor& lens, double scale, const at::Tensor& out, const Shape& s,
         bool generic) {
  const T* qp = q.const_data_ptr<T>();
  const T* kvp = kv.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  const int64_t* tp = table.const_data_ptr<int64_t>();
  const int64_t* lp = lens.const_data_ptr<int64_t>();
  const AttendFn<T> fn = generic ? &attend_one<T> : pick<T>(s.dim, s.group);
  const int64_t work_len = 2 * s.group * s.dim + s.dim + s.group * kBlock;
  at::parallel_for(0, q.size(0) * s.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work(work_len);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / s.kv_heads, hk = i % s.kv_heads;
      fn(qp + b * s.qs0 + hk * s.group * s.qs1, kvp + hk * s.ks3, tp + b * s.width, lp[b],
         op + b * s.os0 + hk * s.group * s.os1, s, static_cast<float>(scale), work.data());
    }
  });
}

// every page a sequence reads must be one of the pool's: a bad table is an error, not a
// read past the pool (O(B * W) integer checks, nothing beside the attention itself)
void check_pages(const at::Tensor& table, const at::Tensor& lens, int64_t pages, int64_t page) {
  const int64_t* t = table.const_data_ptr<int64_t>();
  const int64_t* l = lens.const_data_ptr<int64_t>();
  const int64_t width = table.size(1);
  for (int64_t b = 0; b < table.size(0); ++b) {
    TORCH_CHECK(l[b] >= 0 && l[b] <= width * page, "lens[", b, "] = ", l[b],
                " does not fit its ", width, " pages of ", page, " tokens");
    for (int64_t i = 0; i < (l[b] + page - 1) / page; ++i)
      TORCH_CHECK(t[b * width + i] >= 0 && t[b * width + i] < pages, "table[", b, "][", i,
                  "] = ", t[b * width + i], " is not a page of the pool (", pages, " pages)");
  }
}

// q [B, H, D], kv [P, page, 2, Hkv, D] (any strides, last dim contiguous), table [B, W]
// int64 contiguous, lens [B] int64 contiguous, out [B, H, D] (last dim contiguous).
void paged_decode_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& table,
                            const at::Tensor& lens, double scale, const at::Tensor& out,
                            bool generic) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 5 && table.dim() == 2 && lens.dim() == 1,
              "expected q [B,H,D], kv [P,page,2,Hkv,D], table [B,W], lens [B]");
  TORCH_CHECK(q.device().is_cpu() && kv.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(kv.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, kv and out must share a dtype");
  TORCH_CHECK(table.scalar_type() == at::kLong && lens.scalar_type() == at::kLong &&
              table.is_contiguous() && lens.is_contiguous(), "table/lens: contiguous int64");
  TORCH_CHECK(q.stride(2) == 1 && kv.stride(4) == 1 && out.stride(2) == 1,
              "last dims must be contiguous");
  TORCH_CHECK(out.sizes() == q.sizes() && table.size(0) == q.size(0) && lens.size(0) == q.size(0),
              "shape mismatch");
  Shape s{q.size(1), kv.size(3), 0, q.size(2), kv.size(1), table.size(1),
          q.stride(0), q.stride(1), out.stride(0), out.stride(1),
          kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3)};
  TORCH_CHECK(kv.size(4) == s.dim && s.kv_heads > 0 && s.heads % s.kv_heads == 0,
              "head_dim / GQA mismatch");
  s.group = s.heads / s.kv_heads;
  TORCH_CHECK(s.group <= 64, "at most 64 query heads per kv head");
  check_pages(table, lens, kv.size(0), s.page);
  if (q.scalar_type() == at::kFloat) {
    run<float>(q, kv, table, lens, scale, out, s, generic);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
    run<c10::BFloat16>(q, kv, table, lens, scale, out, s, generic);
  }
}

}  // namespace

TORCH_LIBRARY(pdmesh_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor kv, Tensor table, Tensor lens, float scale, "
        "Tensor(a!) out, bool generic=False) -> ()");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
}
