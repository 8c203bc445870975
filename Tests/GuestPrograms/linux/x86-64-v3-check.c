/* A user program built with gcc -march=x86-64-v3 -O2 -static by LinuxBootTests: it runs the
 * x86-64-v3 extensions for real (AVX2, FMA, F16C, BMI1/2, LZCNT, MOVBE) on deterministic
 * data and prints the results exactly (floats as their bit patterns), so its output in a
 * guest can be compared with the same binary's output on the host. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

enum { count = 4096 };

static float left[count] __attribute__((aligned(32)));
static float right[count] __attribute__((aligned(32)));
static uint32_t words[count] __attribute__((aligned(32)));

static uint32_t state = 0x12345678u;
static uint32_t next_random(void) {
  state = state * 1664525u + 1013904223u;
  return state;
}

static uint32_t float_bits(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  return bits;
}

/* A dot product with 256-bit fused multiply-adds: one rounding per element. */
static float dot_product(void) {
  __m256 sum = _mm256_setzero_ps();
  for (int index = 0; index < count; index += 8) {
    sum = _mm256_fmadd_ps(_mm256_load_ps(left + index), _mm256_load_ps(right + index), sum);
  }
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  half = _mm_hadd_ps(half, half);
  half = _mm_hadd_ps(half, half);
  return _mm_cvtss_f32(half);
}

/* An integer checksum through lane-crossing permutes, byte shuffles, multiplies and shifts. */
static uint64_t vector_checksum(void) {
  const __m256i order = _mm256_setr_epi32(7, 2, 5, 0, 3, 6, 1, 4);
  const __m256i bytes = _mm256_setr_epi8(3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12, 0, 5, 10, 15, 4, 9,
                                         14, 3, 8, 13, 2, 7, 12, 1, 6, 11);
  __m256i accumulator = _mm256_set1_epi32(0x9E3779B9);
  for (int index = 0; index < count; index += 8) {
    __m256i value = _mm256_load_si256((const __m256i *)(words + index));
    value = _mm256_permutevar8x32_epi32(value, order);
    value = _mm256_shuffle_epi8(value, bytes);
    accumulator = _mm256_add_epi32(_mm256_mullo_epi32(accumulator, _mm256_set1_epi32(31)), value);
    accumulator = _mm256_xor_si256(accumulator, _mm256_srlv_epi32(accumulator, _mm256_set1_epi32(13)));
  }
  uint32_t lanes[8];
  _mm256_storeu_si256((__m256i *)lanes, accumulator);
  uint64_t result = 0;
  for (int lane = 0; lane < 8; lane++) result = result * 1000003u + lanes[lane];
  return result;
}

/* Half-precision round trips (F16C) summed as bits. */
static uint64_t half_precision_checksum(void) {
  uint64_t result = 0;
  for (int index = 0; index < count; index += 8) {
    __m128i halves = _mm256_cvtps_ph(_mm256_load_ps(left + index), _MM_FROUND_TO_NEAREST_INT);
    __m256 back = _mm256_cvtph_ps(halves);
    float values[8];
    _mm256_storeu_ps(values, back);
    for (int lane = 0; lane < 8; lane++) result = result * 31 + float_bits(values[lane]);
  }
  return result;
}

/* Scalar extensions: PDEP/PEXT (BMI2), ANDN/BLSR/TZCNT (BMI1), LZCNT, MOVBE. */
static uint64_t scalar_checksum(void) {
  uint64_t result = 0;
  for (int index = 0; index + 1 < count; index += 2) {
    uint64_t value = (uint64_t)words[index] << 32 | words[index + 1];
    uint64_t mask = (uint64_t)words[index + 1] * 0x9E3779B97F4A7C15ull;
    result += _pdep_u64(value, mask) ^ _pext_u64(value, ~mask);
    result += _andn_u64(value, mask) + _blsr_u64(value | 1) + _tzcnt_u64(value | 1u << 20);
    result += _lzcnt_u64(value >> (index & 31));
    result = (result << 7 | result >> 57) ^ __builtin_bswap64(value);
  }
  return result;
}

int main(void) {
  for (int index = 0; index < count; index++) {
    left[index] = (float)(int32_t)(next_random() >> 8) / 65536.0f;
    right[index] = (float)(int32_t)(next_random() >> 12) / 4096.0f;
    words[index] = next_random();
  }
  printf("avx2 %d fma %d f16c %d bmi2 %d\n", !!__builtin_cpu_supports("avx2"), !!__builtin_cpu_supports("fma"),
         !!__builtin_cpu_supports("f16c"), !!__builtin_cpu_supports("bmi2"));
  printf("dot product %08x\n", float_bits(dot_product()));
  printf("vector checksum %016llx\n", (unsigned long long)vector_checksum());
  printf("half precision %016llx\n", (unsigned long long)half_precision_checksum());
  printf("scalar checksum %016llx\n", (unsigned long long)scalar_checksum());
  return 0;
}
