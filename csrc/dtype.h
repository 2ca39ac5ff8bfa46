// Element types the core reads, and their conversion to float. Shared by the CPU and
// CUDA sources, so everything here is host/device inline.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define AFIE_HD __host__ __device__ __forceinline__
#else
#define AFIE_HD inline
#endif

namespace afie {

enum class DType : int { f16 = 0, bf16 = 1, f32 = 2, f64 = 3 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f16: return "float16";
    case DType::bf16: return "bfloat16";
    case DType::f32: return "float32";
    case DType::f64: return "float64";
  }
  return "?";
}

// IEEE binary16 -> float, bit by bit (no dependence on compiler half support).
AFIE_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// bfloat16 is the top half of a float32.
AFIE_HD float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = (uint32_t)b << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

// Load element i (in elements, not bytes) of a buffer of type T as double.
template <DType T> struct Load;
template <> struct Load<DType::f16> {
  AFIE_HD static double at(const void* p, int64_t i) { return half_bits_to_float(static_cast<const uint16_t*>(p)[i]); }
};
template <> struct Load<DType::bf16> {
  AFIE_HD static double at(const void* p, int64_t i) { return bf16_bits_to_float(static_cast<const uint16_t*>(p)[i]); }
};
template <> struct Load<DType::f32> {
  AFIE_HD static double at(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
};
template <> struct Load<DType::f64> {
  AFIE_HD static double at(const void* p, int64_t i) { return static_cast<const double*>(p)[i]; }
};

// Calls f.template operator()<T>() for the runtime dtype t.
template <class F> decltype(auto) dispatch_dtype(DType t, F&& f) {
  switch (t) {
    case DType::f16: return f.template operator()<DType::f16>();
    case DType::bf16: return f.template operator()<DType::bf16>();
    case DType::f32: return f.template operator()<DType::f32>();
    default: return f.template operator()<DType::f64>();
  }
}

}  // namespace afie
