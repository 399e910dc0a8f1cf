/* Tree-ensemble scoring kernel, compiled once per model with its trees as constant tables.

   Every tree is stored as a complete binary tree of depth D (shorter branches padded with
   always-left nodes whose leaves repeat the value), in level order: internal node k has
   children 2k+1 (left) and 2k+2 (right), leaf k is LEAF[k - NI]. A row goes left when
   x < threshold, or when x is missing (NaN) and the node's default is left (bit 31 of FEAT;
   the low bits hold feature * LANE_SCALE, so that a lane offset is added directly).

   Rows are scored 16 (AVX-512) or 8 (AVX2) at a time, one per vector lane, in the layout that
   `score_simd` makes: [vector][feature][lane]. The nodes of levels 0-5 of a tree come from
   registers by permutes (AVX2: levels 4 and 5 blend 2 or 4 of them) rather than memory gathers;
   deeper levels gather. Level 0's
   feature is the same for every lane, so its values are one plain load. A scalar path serves
   other CPUs. Sums start from the caller's base margin and run in float32 tree by tree, as
   XGBoost adds its trees, so the scores equal XGBoost's. */
#include <stdlib.h>
#include <string.h>

#define FEATURE_MASK 0x7fffffff
#define LANE_SCALE 16

/* The portable path: 64 rows descend each tree level by level (independent rows keep the
   CPU busy while one row's load is pending), reading rows in place. */
#ifndef SCALAR_ROWS
#define SCALAR_ROWS 64
#endif
static void score_rows(const float* rows, int n, const float* init, double* out) {
  for (int r0 = 0; r0 < n; r0 += SCALAR_ROWS) {
    int m = n - r0 < SCALAR_ROWS ? n - r0 : SCALAR_ROWS;
    float sum[SCALAR_ROWS];
    int k[SCALAR_ROWS];
    for (int i = 0; i < m; ++i) sum[i] = init ? init[r0 + i] : 0.f;
    for (int t = 0; t < T; ++t) {
      const int* f = FEAT16 + (size_t)t * S;
      const float* th = THR + (size_t)t * S;
      for (int i = 0; i < m; ++i) k[i] = 0;
      for (int d = 0; d < D; ++d)
        for (int i = 0; i < m; ++i) {
          int node = k[i];
          float v = rows[(size_t)(r0 + i) * NF + (f[node] & FEATURE_MASK) / LANE_SCALE];
          int left = (v < th[node]) | ((v != v) & (f[node] < 0));
          k[i] = 2 * node + 2 - left;
        }
      const float* leaf = LEAF + (size_t)t * NL;
      for (int i = 0; i < m; ++i) sum[i] += leaf[k[i] - NI];
    }
    for (int i = 0; i < m; ++i) out[r0 + i] = sum[i];
  }
}

#if defined(__x86_64__) || defined(__i386__)
#define HAVE_X86_SIMD 1
#include <immintrin.h>

/* SIMD paths: groups of G blocks of 16 (AVX-512) or 8 (AVX2) rows descend each tree together
   (independent vectors keep the gathers of one busy while another waits); one function per G so
   that a window's last rows pad at most one vector. */
#define MAX_G512 5
#define MAX_G256 6

__attribute__((target("avx512f")))
static inline __attribute__((always_inline)) __m512i lookup16(const int* tab, int level, __m512i idx) {
  if (level == 0) return _mm512_set1_epi32(tab[0]);
  int first = (1 << level) - 1;
  __m512i j = _mm512_sub_epi32(idx, _mm512_set1_epi32(first));
  if (level <= 4) return _mm512_permutexvar_epi32(j, _mm512_loadu_si512(tab + first));
  if (level == 5) return _mm512_permutex2var_epi32(_mm512_loadu_si512(tab + first), j, _mm512_loadu_si512(tab + first + 16));
  return _mm512_i32gather_epi32(idx, tab, 4);
}

/* G groups of 16 rows, layout [group][feature][16]; sums: the starting values in, the scores out */
#define SCORE_GROUPS16(G)                                                                                  \
__attribute__((target("avx512f")))                                                                        \
static void score_groups16_##G(const float* block, float* sums) {                                         \
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);            \
  const __m512i two = _mm512_set1_epi32(2), one = _mm512_set1_epi32(1), low = _mm512_set1_epi32(FEATURE_MASK); \
  const __m512i ni = _mm512_set1_epi32(NI), zero = _mm512_setzero_si512();                                \
  __m512 sum[G];                                                                                           \
  for (int g = 0; g < G; ++g) sum[g] = _mm512_loadu_ps(sums + 16 * g);                                    \
  for (int t = 0; t < T; ++t) {                                                                            \
    const int* f = FEAT16 + (size_t)t * S;                                                                 \
    const int* th = (const int*)(THR + (size_t)t * S);                                                     \
    __m512i idx[G];                                                                                        \
    for (int g = 0; g < G; ++g) idx[g] = zero;                                                             \
    _Pragma("GCC unroll 16") for (int d = 0; d < D; ++d) {                                                 \
      _Pragma("GCC unroll 8") for (int g = 0; g < G; ++g) {                                                \
        __m512i fi = lookup16(f, d, idx[g]);                                                               \
        __m512 tv = _mm512_castsi512_ps(lookup16(th, d, idx[g]));                                          \
        const float* rows = block + g * 16 * NF;                                                           \
        __m512 xv = d == 0 ? _mm512_loadu_ps(rows + (f[0] & FEATURE_MASK))                                \
                           : _mm512_i32gather_ps(_mm512_add_epi32(_mm512_and_si512(fi, low), lane), rows, 4); \
        __mmask16 left = _mm512_cmp_ps_mask(xv, tv, _CMP_LT_OQ)                                            \
                       | (_mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q) & _mm512_cmplt_epi32_mask(fi, zero));   \
        __m512i next = _mm512_add_epi32(_mm512_add_epi32(idx[g], idx[g]), two);                            \
        idx[g] = _mm512_mask_sub_epi32(next, left, next, one);                                             \
      }                                                                                                    \
    }                                                                                                      \
    const float* leaf = LEAF + (size_t)t * NL;                                                             \
    for (int g = 0; g < G; ++g) sum[g] = _mm512_add_ps(sum[g], _mm512_i32gather_ps(_mm512_sub_epi32(idx[g], ni), leaf, 4)); \
  }                                                                                                        \
  for (int g = 0; g < G; ++g) _mm512_storeu_ps(sums + 16 * g, sum[g]);                                    \
}
SCORE_GROUPS16(1)
SCORE_GROUPS16(2)
SCORE_GROUPS16(3)
SCORE_GROUPS16(4)
SCORE_GROUPS16(5)

__attribute__((target("avx2")))
static inline __attribute__((always_inline)) __m256i lookup8(const int* tab, int level, __m256i idx) {
  if (level == 0) return _mm256_set1_epi32(tab[0]);
  int first = (1 << level) - 1;
  __m256i j = _mm256_sub_epi32(idx, _mm256_set1_epi32(first));
  if (level <= 3) return _mm256_permutevar8x32_epi32(_mm256_loadu_si256((const __m256i*)(tab + first)), j);
  if (level <= 5) { /* 16 or 32 nodes: permute each 8, then blend by bit 3 (and bit 4) of j */
    const __m256i* t = (const __m256i*)(tab + first);
    __m256 bit3 = _mm256_castsi256_ps(_mm256_slli_epi32(j, 28));
    __m256 lo = _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_permutevar8x32_epi32(_mm256_loadu_si256(t), j)),
                                 _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(_mm256_loadu_si256(t + 1), j)), bit3);
    if (level == 4) return _mm256_castps_si256(lo);
    __m256 hi = _mm256_blendv_ps(_mm256_castsi256_ps(_mm256_permutevar8x32_epi32(_mm256_loadu_si256(t + 2), j)),
                                 _mm256_castsi256_ps(_mm256_permutevar8x32_epi32(_mm256_loadu_si256(t + 3), j)), bit3);
    return _mm256_castps_si256(_mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(j, 27))));
  }
  return _mm256_i32gather_epi32(tab, idx, 4);
}

/* G groups of 8 rows, layout [group][feature][8]; FEAT16 holds feature * 16, halved here */
#define SCORE_GROUPS8(G)                                                                                   \
__attribute__((target("avx2")))                                                                           \
static void score_groups8_##G(const float* block, float* sums) {                                          \
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);                                         \
  const __m256i two = _mm256_set1_epi32(2), low = _mm256_set1_epi32(FEATURE_MASK), ni = _mm256_set1_epi32(NI); \
  __m256 sum[G];                                                                                           \
  for (int g = 0; g < G; ++g) sum[g] = _mm256_loadu_ps(sums + 8 * g);                                     \
  for (int t = 0; t < T; ++t) {                                                                            \
    const int* f = FEAT16 + (size_t)t * S;                                                                 \
    const int* th = (const int*)(THR + (size_t)t * S);                                                     \
    __m256i idx[G];                                                                                        \
    for (int g = 0; g < G; ++g) idx[g] = _mm256_setzero_si256();                                          \
    _Pragma("GCC unroll 16") for (int d = 0; d < D; ++d) {                                                 \
      _Pragma("GCC unroll 8") for (int g = 0; g < G; ++g) {                                                \
        __m256i fi = lookup8(f, d, idx[g]);                                                                \
        __m256 tv = _mm256_castsi256_ps(lookup8(th, d, idx[g]));                                           \
        const float* rows = block + g * 8 * NF;                                                            \
        __m256 xv = d == 0 ? _mm256_loadu_ps(rows + (f[0] & FEATURE_MASK) / 2)                             \
                           : _mm256_i32gather_ps(rows, _mm256_add_epi32(_mm256_srli_epi32(_mm256_and_si256(fi, low), 1), lane), 4); \
        __m256 lt = _mm256_cmp_ps(xv, tv, _CMP_LT_OQ);                                                     \
        __m256 miss = _mm256_and_ps(_mm256_cmp_ps(xv, xv, _CMP_UNORD_Q), _mm256_castsi256_ps(_mm256_srai_epi32(fi, 31))); \
        idx[g] = _mm256_add_epi32(_mm256_add_epi32(idx[g], idx[g]), _mm256_add_epi32(two, _mm256_castps_si256(_mm256_or_ps(lt, miss)))); \
      }                                                                                                    \
    }                                                                                                      \
    const float* leaf = LEAF + (size_t)t * NL;                                                             \
    for (int g = 0; g < G; ++g) sum[g] = _mm256_add_ps(sum[g], _mm256_i32gather_ps(leaf, _mm256_sub_epi32(idx[g], ni), 4)); \
  }                                                                                                        \
  for (int g = 0; g < G; ++g) _mm256_storeu_ps(sums + 8 * g, sum[g]);                                     \
}
SCORE_GROUPS8(1)
SCORE_GROUPS8(2)
SCORE_GROUPS8(3)
SCORE_GROUPS8(4)
SCORE_GROUPS8(5)
SCORE_GROUPS8(6)

typedef void (*score_groups_fn)(const float*, float*);
static const score_groups_fn GROUPS16[MAX_G512 + 1] = {0, score_groups16_1, score_groups16_2, score_groups16_3,
                                                       score_groups16_4, score_groups16_5};
static const score_groups_fn GROUPS8[MAX_G256 + 1] = {0, score_groups8_1, score_groups8_2, score_groups8_3, score_groups8_4, score_groups8_5, score_groups8_6};

/* Rows in the [group][feature][lane] layout, scored by the widest G that the remaining rows fill
   (the last call pads at most one vector of rows with zeros). */
static int score_simd(const float* rows, int n, const float* init, int width, int max_g,
                      const score_groups_fn* kernels, double* out) {
  int vectors = (n + width - 1) / width;
  float* block = aligned_alloc(64, sizeof(float) * (size_t)vectors * width * NF);
  if (!block) return -1;
  memset(block, 0, sizeof(float) * (size_t)vectors * width * NF);
  for (int i = 0; i < n; ++i) {
    float* group = block + (size_t)(i / width) * width * NF;
    for (int k = 0; k < NF; ++k) group[k * width + i % width] = rows[(size_t)i * NF + k];
  }
  float sums[16 * MAX_G512];
  for (int v = 0; v < vectors;) {
    int g = vectors - v < max_g ? vectors - v : max_g;
    for (int i = 0; i < g * width; ++i) {
      int row = v * width + i;
      sums[i] = init && row < n ? init[row] : 0.f;
    }
    kernels[g](block + (size_t)v * width * NF, sums);
    for (int i = 0; i < g * width && v * width + i < n; ++i) out[v * width + i] = sums[i];
    v += g;
  }
  free(block);
  return 0;
}

#endif /* x86 */

/* The widest path this CPU runs: 2 = AVX-512, 1 = AVX2, 0 = scalar (callers may ask for a lower one) */
int trees_simd_level(void) {
#ifdef HAVE_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return 2;
  if (__builtin_cpu_supports("avx2")) return 1;
#endif
  return 0;
}

int trees_num_feature(void) { return NF; }

/* Score n rows (row-major, NF float32 columns) into out (float64), each sum starting from
   init[i] (a base margin) or 0 when init is NULL. Returns 0, or -1 when out of memory. */
int trees_predict(const float* rows, int n, const float* init, int level, double* out) {
  if (n <= 0) return 0;
#ifdef HAVE_X86_SIMD
  if (level == 2) return score_simd(rows, n, init, 16, MAX_G512, GROUPS16, out);
  if (level == 1) return score_simd(rows, n, init, 8, MAX_G256, GROUPS8, out);
#endif
  score_rows(rows, n, init, out);
  return 0;
}
