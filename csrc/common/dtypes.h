// Element type codes shared by the Python wrapper and every kernel, and exact host-side
// conversions between the 16-bit float formats and fp32 (written as bit operations so that loops
// over them vectorise on any CPU).
#pragma once

#include <cstdint>
#include <cstring>

namespace dpo {

// The numeric values are part of the Python <-> C++ boundary: Python reads them from the module
// (dpo_kernels._C.DTYPE_*), never hard-codes them.
enum class DType : int {
  Float32 = 0,
  Float16 = 1,
  BFloat16 = 2,
  Float64 = 3,
};

inline const char* dtype_name(DType d) {
  switch (d) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Float64: return "float64";
  }
  return "unknown";
}

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// bfloat16 is the top half of an fp32 word.
inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; NaN stays NaN (quiet bit forced so the payload cannot round to inf).
inline uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  return static_cast<uint16_t>(is_nan ? nan : rounded);
}

// IEEE half -> float. Exponent and mantissa are moved into fp32 position and rebased by a
// multiplication with 2^112, which also normalises subnormal halves; inf/NaN get the fp32 all-ones
// exponent.
inline float fp16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t magnitude = static_cast<uint32_t>(h & 0x7fffu) << 13;
  float rebased = bits_to_float(magnitude) * 0x1p112f;
  uint32_t finite = float_to_bits(rebased);
  uint32_t special = magnitude | 0x7f800000u;
  uint32_t body = (h & 0x7fffu) >= 0x7c00u ? special : finite;
  return bits_to_float(sign | body);
}

// float -> IEEE half, round to nearest even, overflow to inf, NaN preserved as a quiet NaN.
inline uint16_t float_to_fp16(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  // Subnormal results: adding 0.5 (as fp32) shifts the mantissa so that the FPU's own
  // round-to-nearest-even produces the half subnormal in the low bits.
  uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - float_to_bits(0.5f);
  // Normal results: rebias the exponent (127 -> 15) and round the 13 dropped bits to even.
  uint32_t norm = (a - ((127u - 15u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  uint32_t out = a < (113u << 23) ? sub : norm;
  out = a >= (143u << 23) ? 0x7c00u : out;         // overflow (>= 65520 rounds to inf)
  out = a > 0x7f800000u ? 0x7e00u : out;           // NaN
  return static_cast<uint16_t>(sign | out);
}

}  // namespace dpo
