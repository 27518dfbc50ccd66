// y[m, n] = scale[n] * sum_k x[m, k] * q[k, n]: float32 activations times int8 weights, for decode-sized M.
// With group-wise scales, y[m, n] = sum_g scale[g, n] * sum_{k in group g} x[m, k] * q[k, n], a group being
// G = K / groups consecutive rows of q: each group's partial sums are accumulated in float32 in a buffer of
// the chunk's width (as y is without groups), then multiplied by the group's scales and added to y.
//
// An XLA FFI handler (jaxlib's xla/ffi/api/ffi.h) for the CPU backend. Arguments: x f32 (M, K), q s8 (K, N)
// row-major (a Flax Dense kernel's layout), scale f32 (N,) or (groups, N) with K a multiple of groups; result
// f32 (M, N); attribute `threads` (int64: 0 = the XLA intra-op thread pool's size, 1 = the calling thread only,
// n = at most n).
//
// The weights are read once, row by row: N is cut into chunks of columns shared between threads by an atomic
// counter; inside a chunk, groups of 8 weight rows are read together (8 sequential streams) and each int8 is
// widened to float32 in registers (AVX2: vpmovsxbd + vcvtdq2ps; AVX-512: the same, 16 lanes), used by up to 4
// rows of x, and multiplied-accumulated in float32 with FMA, so the result equals the float64 reference up to
// float32 rounding of the sums. Weight lines are prefetched into L2 up to 32 rows ahead. Large M is done 32 rows
// at a time per chunk (the chunk's weights then come from L2). The instruction set is chosen at run time
// (__builtin_cpu_supports; ZOO_INT8_ISA in the environment caps it); other CPUs run a portable loop.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ZOO_X86 1
#endif

#ifndef ZOO_SOURCE_KEY
#define ZOO_SOURCE_KEY "unknown"
#endif

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kGroupK = 8;  // weight rows read together: 8 sequential streams, one update of y per group
// Each tile asks for the line of weights `prefetch_rows` rows ahead of the one it reads, into L2 (hint T1):
// without it, matrices of few columns (768) streamed at ~8 GB/s on the EPYC this was measured on, and at ~9
// with the line brought into L1 (T0); into L2, at ~20 (linear reading: ~19; from cache: 27).
constexpr int64_t kPrefetchRows = 32;
constexpr int64_t kPrefetchBytes = 256 * 1024;  // at most this far ahead, so the lines are still in L2 when read

struct Problem {
  const float* x;
  const int8_t* q;
  const float* scale;
  float* y;
  int64_t M, K, N;
  int64_t prefetch_rows;
  int64_t ldy;    // row stride of y (N, or a chunk's width for a group's partial sums)
  int64_t group;  // rows of q per row of scales: K with per-channel scales
};

// Adds x[:, k0:k0+kg] @ q[k0:k0+kg, n0:n1] into y[:, n0:n1].
using GroupFn = void (*)(const Problem&, int64_t n0, int64_t n1, int64_t k0, int64_t kg);

void group_portable(const Problem& p, int64_t n0, int64_t n1, int64_t k0, int64_t kg) {
  for (int64_t m = 0; m < p.M; ++m) {
    float* ym = p.y + m * p.ldy;
    for (int64_t k = k0; k < k0 + kg; ++k) {
      const int8_t* qk = p.q + k * p.N;
      const float xv = p.x[m * p.K + k];
      for (int64_t n = n0; n < n1; ++n) ym[n] += xv * static_cast<float>(qk[n]);
    }
  }
}

// y[0:w] += part[0:w] * s[0:w], then part[0:w] = 0: a group's partial sums scaled into y.
using FoldFn = void (*)(float* y, float* part, const float* s, int64_t w);

void fold_portable(float* y, float* part, const float* s, int64_t w) {
  for (int64_t c = 0; c < w; ++c) {
    y[c] += part[c] * s[c];
    part[c] = 0.0f;
  }
}

// Columns [n, n1) that are not a whole vector: a plain loop over MB rows.
void tail_columns(const Problem& p, int64_t m0, int MB, int64_t n, int64_t n1, int64_t k0, int64_t kg) {
  for (int i = 0; i < MB; ++i) {
    float* ym = p.y + (m0 + i) * p.ldy;
    const float* xm = p.x + (m0 + i) * p.K;
    for (int64_t k = k0; k < k0 + kg; ++k)
      for (int64_t c = n; c < n1; ++c) ym[c] += xm[k] * static_cast<float>(p.q[k * p.N + c]);
  }
}

#ifdef ZOO_X86

// y[m0:m0+MB, n:n+8*NV] += x[m0:m0+MB, k0:k0+KG] @ q[k0:k0+KG, n:n+8*NV]; each weight vector is widened once
// and used by all MB rows.
template <int MB, int NV, int KG>
__attribute__((target("avx2,fma"), always_inline)) inline void tile_avx2(const Problem& p, int64_t m0, int64_t n,
                                                                         int64_t k0) {
  __m256 acc[MB][NV];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm256_loadu_ps(p.y + (m0 + i) * p.ldy + n + 8 * j);
  for (int kk = 0; kk < KG; ++kk) {
    const int8_t* qk = p.q + (k0 + kk) * p.N + n;
    if (k0 + kk + p.prefetch_rows < p.K)
      _mm_prefetch(reinterpret_cast<const char*>(qk + p.prefetch_rows * p.N), _MM_HINT_T1);
    for (int j = 0; j < NV; ++j) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qk + 8 * j));
      const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
      for (int i = 0; i < MB; ++i)
        acc[i][j] = _mm256_fmadd_ps(_mm256_broadcast_ss(p.x + (m0 + i) * p.K + k0 + kk), w, acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NV; ++j) _mm256_storeu_ps(p.y + (m0 + i) * p.ldy + n + 8 * j, acc[i][j]);
}

template <int MB, int KG>
__attribute__((target("avx2,fma"))) void rows_avx2(const Problem& p, int64_t m0, int64_t n0, int64_t n1,
                                                   int64_t k0) {
  constexpr int NV = MB == 1 ? 4 : 2;
  int64_t n = n0;
  for (; n + 8 * NV <= n1; n += 8 * NV) tile_avx2<MB, NV, KG>(p, m0, n, k0);
  for (; n + 8 <= n1; n += 8) tile_avx2<MB, 1, KG>(p, m0, n, k0);
  if (n < n1) tail_columns(p, m0, MB, n, n1, k0, KG);
}

template <int KG>
__attribute__((target("avx2,fma"))) void group_avx2_kg(const Problem& p, int64_t n0, int64_t n1, int64_t k0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) rows_avx2<4, KG>(p, m, n0, n1, k0);
  switch (p.M - m) {
    case 3: rows_avx2<3, KG>(p, m, n0, n1, k0); break;
    case 2: rows_avx2<2, KG>(p, m, n0, n1, k0); break;
    case 1: rows_avx2<1, KG>(p, m, n0, n1, k0); break;
    default: break;
  }
}

void group_avx2(const Problem& p, int64_t n0, int64_t n1, int64_t k0, int64_t kg) {
  if (kg == kGroupK) return group_avx2_kg<kGroupK>(p, n0, n1, k0);
  for (int64_t k = k0; k < k0 + kg; ++k) group_avx2_kg<1>(p, n0, n1, k);
}

__attribute__((target("avx2,fma"))) void fold_avx2(float* y, float* part, const float* s, int64_t w) {
  int64_t c = 0;
  for (; c + 8 <= w; c += 8) {
    _mm256_storeu_ps(y + c, _mm256_fmadd_ps(_mm256_loadu_ps(part + c), _mm256_loadu_ps(s + c), _mm256_loadu_ps(y + c)));
    _mm256_storeu_ps(part + c, _mm256_setzero_ps());
  }
  fold_portable(y + c, part + c, s + c, w - c);
}

// The same with 16-lane vectors.
template <int MB, int NV, int KG>
__attribute__((target("avx512f,avx512bw,fma"), always_inline)) inline void tile_avx512(const Problem& p, int64_t m0,
                                                                                       int64_t n, int64_t k0) {
  __m512 acc[MB][NV];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = _mm512_loadu_ps(p.y + (m0 + i) * p.ldy + n + 16 * j);
  for (int kk = 0; kk < KG; ++kk) {
    const int8_t* qk = p.q + (k0 + kk) * p.N + n;
    if (k0 + kk + p.prefetch_rows < p.K)
      _mm_prefetch(reinterpret_cast<const char*>(qk + p.prefetch_rows * p.N), _MM_HINT_T1);
    for (int j = 0; j < NV; ++j) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qk + 16 * j));
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
      for (int i = 0; i < MB; ++i)
        acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(p.x[(m0 + i) * p.K + k0 + kk]), w, acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(p.y + (m0 + i) * p.ldy + n + 16 * j, acc[i][j]);
}

template <int MB, int KG>
__attribute__((target("avx512f,avx512bw,fma"))) void rows_avx512(const Problem& p, int64_t m0, int64_t n0,
                                                                 int64_t n1, int64_t k0) {
  constexpr int NV = MB <= 2 ? 4 : 2;
  int64_t n = n0;
  for (; n + 16 * NV <= n1; n += 16 * NV) tile_avx512<MB, NV, KG>(p, m0, n, k0);
  for (; n + 16 <= n1; n += 16) tile_avx512<MB, 1, KG>(p, m0, n, k0);
  if (n < n1) tail_columns(p, m0, MB, n, n1, k0, KG);
}

template <int KG>
__attribute__((target("avx512f,avx512bw,fma"))) void group_avx512_kg(const Problem& p, int64_t n0, int64_t n1,
                                                                     int64_t k0) {
  int64_t m = 0;
  for (; m + 4 <= p.M; m += 4) rows_avx512<4, KG>(p, m, n0, n1, k0);
  switch (p.M - m) {
    case 3: rows_avx512<3, KG>(p, m, n0, n1, k0); break;
    case 2: rows_avx512<2, KG>(p, m, n0, n1, k0); break;
    case 1: rows_avx512<1, KG>(p, m, n0, n1, k0); break;
    default: break;
  }
}

void group_avx512(const Problem& p, int64_t n0, int64_t n1, int64_t k0, int64_t kg) {
  if (kg == kGroupK) return group_avx512_kg<kGroupK>(p, n0, n1, k0);
  for (int64_t k = k0; k < k0 + kg; ++k) group_avx512_kg<1>(p, n0, n1, k);
}

__attribute__((target("avx512f,fma"))) void fold_avx512(float* y, float* part, const float* s, int64_t w) {
  int64_t c = 0;
  for (; c + 16 <= w; c += 16) {
    _mm512_storeu_ps(y + c, _mm512_fmadd_ps(_mm512_loadu_ps(part + c), _mm512_loadu_ps(s + c), _mm512_loadu_ps(y + c)));
    _mm512_storeu_ps(part + c, _mm512_setzero_ps());
  }
  fold_portable(y + c, part + c, s + c, w - c);
}

#endif  // ZOO_X86

// 0 = portable, 1 = AVX2+FMA, 2 = AVX-512; ZOO_INT8_ISA in the environment caps it (for measurement).
int detect_isa() {
  int isa = 0;
#ifdef ZOO_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = 1;
  if (isa == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) isa = 2;
#endif
  if (const char* cap = std::getenv("ZOO_INT8_ISA")) isa = std::min(isa, std::atoi(cap));
  return isa;
}

GroupFn group_fn(int isa) {
#ifdef ZOO_X86
  if (isa >= 2) return group_avx512;
  if (isa == 1) return group_avx2;
#endif
  return group_portable;
}

FoldFn fold_fn(int isa) {
#ifdef ZOO_X86
  if (isa >= 2) return fold_avx512;
  if (isa == 1) return fold_avx2;
#endif
  return fold_portable;
}

const int kIsa = detect_isa();

constexpr int64_t kBlockM = 32;  // rows of x per pass over a chunk of weights (large M: prefill)

// Column chunks: y[rows, chunk] stays in L2 (<= 128 KiB) while every group of weight rows passes through it, and
// there are a few chunks per thread so that a thread slowed by other processes does not hold the others up.
int64_t chunk_width(int64_t M, int64_t N, int64_t threads) {
  const int64_t rows = std::min(std::max<int64_t>(M, 1), kBlockM);
  int64_t w = std::max<int64_t>(256, (128 * 1024 / 4) / rows);
  if (threads > 1) w = std::min(w, std::max<int64_t>(256, N / (4 * threads)));
  w = (w + 63) / 64 * 64;
  return std::min(w, N);
}

// Adds x[:, k0:k1] @ q[k0:k1, n0:n1] into y[:, n0:n1], kGroupK rows of q at a time.
void run_rows(const Problem& p, GroupFn fn, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
  for (int64_t k = k0; k < k1; k += kGroupK) fn(p, n0, n1, k, std::min(kGroupK, k1 - k));
}

// y[:, n0:n1] = (x @ q[:, n0:n1]) * scale[n0:n1] (per-channel), or the sum over groups of each group's partial
// sums (in `partial`, the chunk's width wide) times its row of scales; kBlockM rows of x at a time.
void run_chunk(const Problem& p, GroupFn fn, FoldFn fold, int64_t n0, int64_t n1, std::vector<float>& partial) {
  const int64_t width = n1 - n0;
  for (int64_t m0 = 0; m0 < p.M; m0 += kBlockM) {
    Problem b = p;
    b.prefetch_rows = std::max<int64_t>(kGroupK, std::min(kPrefetchRows, kPrefetchBytes / width));
    b.x = p.x + m0 * p.K;
    b.y = p.y + m0 * p.N;
    b.M = std::min(kBlockM, p.M - m0);
    for (int64_t m = 0; m < b.M; ++m) std::memset(b.y + m * p.N + n0, 0, width * sizeof(float));
    if (p.group >= p.K) {
      run_rows(b, fn, n0, n1, 0, p.K);
      for (int64_t m = 0; m < b.M; ++m) {
        float* ym = b.y + m * p.N;
        for (int64_t n = n0; n < n1; ++n) ym[n] *= p.scale[n];
      }
      continue;
    }
    partial.assign(b.M * width, 0.0f);
    Problem g = b;
    g.y = partial.data() - n0;  // the group functions index y[m * ldy + n] with n in [n0, n1)
    g.ldy = width;
    for (int64_t k0 = 0; k0 < p.K; k0 += p.group) {
      run_rows(g, fn, n0, n1, k0, k0 + p.group);
      for (int64_t m = 0; m < b.M; ++m)
        fold(b.y + m * p.N + n0, partial.data() + m * width, p.scale + (k0 / p.group) * p.N + n0, width);
    }
  }
}

// Chunks handed out by an atomic counter; a helper task that starts after the work is gone touches nothing.
struct Shared {
  Problem p;
  GroupFn fn;
  FoldFn fold;
  int64_t width, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void work(Shared& s) {
  int64_t mine = 0;
  std::vector<float> partial;
  for (int64_t i = s.next.fetch_add(1, std::memory_order_relaxed); i < s.chunks;
       i = s.next.fetch_add(1, std::memory_order_relaxed)) {
    run_chunk(s.p, s.fn, s.fold, i * s.width, std::min(s.p.N, (i + 1) * s.width), partial);
    ++mine;
  }
  if (mine) s.done.fetch_add(mine, std::memory_order_acq_rel);
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                          ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> y, int64_t threads) {
  const auto xd = x.dimensions(), qd = q.dimensions(), sd = scale.dimensions();
  if (xd.size() != 2 || qd.size() != 2 || (sd.size() != 1 && sd.size() != 2))
    return ffi::Error::InvalidArgument("zoo_int8_matmul: x must be (M, K), q (K, N), scale (N,) or (groups, N)");
  const int64_t M = xd[0], K = xd[1], N = qd[1];
  const int64_t groups = sd.size() == 2 ? sd[0] : 1;
  if (qd[0] != K || sd[sd.size() - 1] != N || groups < 1 || K % groups != 0)
    return ffi::Error::InvalidArgument(
        "zoo_int8_matmul: x (M, K), q (K, N) and scale (N,) or (groups, N) with K a multiple of groups disagree");
  if (M == 0 || N == 0) return ffi::Error::Success();
  // the calling thread works too: at most num_threads workers in all (XLA's pool has one thread per core)
  int64_t helpers = threads == 1 ? 0 : std::max<int64_t>(pool.num_threads() - 1, 0);
  if (threads > 1) helpers = std::min(helpers, threads - 1);
  auto shared = std::make_shared<Shared>();
  shared->p = Problem{x.typed_data(), q.typed_data(), scale.typed_data(), y->typed_data(), M, K, N, 0, N,
                      K / groups};
  shared->fn = group_fn(kIsa);
  shared->fold = fold_fn(kIsa);
  shared->width = chunk_width(M, N, helpers + 1);
  shared->chunks = (N + shared->width - 1) / shared->width;
  helpers = std::min(helpers, shared->chunks - 1);
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { work(*shared); });
  work(*shared);
  while (shared->done.load(std::memory_order_acquire) < shared->chunks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ZooInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));

// The instruction set in use (0 portable, 1 AVX2+FMA, 2 AVX-512) and the source key the library was built from.
extern "C" int zoo_int8_isa() { return kIsa; }
extern "C" const char* zoo_int8_source_key() { return ZOO_SOURCE_KEY; }
