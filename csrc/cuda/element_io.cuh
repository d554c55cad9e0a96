// Global-memory access to logits of one element type (float, __nv_bfloat16, __half): one element
// or 16 bytes at a time, converted to and from fp32 registers. Stores round to nearest even.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace dpo::cuda {

// How a load or store treats the caches. kStreaming (ld/st.global.cs, evict first) for the logits
// path, which touches each element once; kDefault for tiles that a GEMM reads or writes next.
enum class CachePolicy { kStreaming, kDefault };

template <typename To, typename From>
__device__ __forceinline__ To bit_cast_to(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_to needs equal sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

template <CachePolicy P, typename U>
__device__ __forceinline__ U load_raw(const U* p) {
  if constexpr (P == CachePolicy::kStreaming) {
    return __ldcs(p);
  } else {
    return *p;
  }
}

template <CachePolicy P, typename U>
__device__ __forceinline__ void store_raw(U* p, U value) {
  if constexpr (P == CachePolicy::kStreaming) {
    __stcs(p, value);
  } else {
    *p = value;
  }
}

// Per element type: Bits (the type a scalar moves as), kPerVector (elements in 16 bytes),
// kNegInfWord (a 32-bit word of -inf elements, the padding of a partial vector), and the fp32
// conversions of a scalar and of a 16-byte vector.
template <typename T>
struct ElementIo;

template <>
struct ElementIo<float> {
  using Bits = float;
  static constexpr int kPerVector = 4;
  static constexpr uint32_t kNegInfWord = 0xff800000u;

  __device__ __forceinline__ static float from_bits(float b) { return b; }
  __device__ __forceinline__ static float to_bits(float v) { return v; }
  __device__ __forceinline__ static void unpack(const uint4& r, float (&z)[4]) {
    z[0] = __uint_as_float(r.x);
    z[1] = __uint_as_float(r.y);
    z[2] = __uint_as_float(r.z);
    z[3] = __uint_as_float(r.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&z)[4]) {
    return make_uint4(__float_as_uint(z[0]), __float_as_uint(z[1]), __float_as_uint(z[2]), __float_as_uint(z[3]));
  }
};

// The 16-byte vector of a 16-bit type: four 32-bit words of two elements each, converted by the
// type's unpack_word / pack_word.
template <typename Io>
struct PairedWordVectorIo {
  __device__ __forceinline__ static void unpack(const uint4& r, float (&z)[8]) {
    Io::unpack_word(r.x, z[0], z[1]);
    Io::unpack_word(r.y, z[2], z[3]);
    Io::unpack_word(r.z, z[4], z[5]);
    Io::unpack_word(r.w, z[6], z[7]);
  }
  __device__ __forceinline__ static uint4 pack(const float (&z)[8]) {
    return make_uint4(Io::pack_word(z[0], z[1]), Io::pack_word(z[2], z[3]), Io::pack_word(z[4], z[5]),
                      Io::pack_word(z[6], z[7]));
  }
};

template <>
struct ElementIo<__nv_bfloat16> : PairedWordVectorIo<ElementIo<__nv_bfloat16>> {
  using Bits = unsigned short;
  static constexpr int kPerVector = 8;
  static constexpr uint32_t kNegInfWord = 0xff80ff80u;

  // bf16 is the upper half of an fp32 word: widening is a shift.
  __device__ __forceinline__ static float from_bits(unsigned short b) { return __uint_as_float(uint32_t(b) << 16); }
  __device__ __forceinline__ static unsigned short to_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  __device__ __forceinline__ static void unpack_word(uint32_t w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static uint32_t pack_word(float lo, float hi) {
    return bit_cast_to<uint32_t>(__floats2bfloat162_rn(lo, hi));
  }
};

template <>
struct ElementIo<__half> : PairedWordVectorIo<ElementIo<__half>> {
  using Bits = unsigned short;
  static constexpr int kPerVector = 8;
  static constexpr uint32_t kNegInfWord = 0xfc00fc00u;

  __device__ __forceinline__ static float from_bits(unsigned short b) { return __half2float(__ushort_as_half(b)); }
  __device__ __forceinline__ static unsigned short to_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ __forceinline__ static void unpack_word(uint32_t w, float& lo, float& hi) {
    const float2 f = __half22float2(bit_cast_to<__half2>(w));
    lo = f.x;
    hi = f.y;
  }
  __device__ __forceinline__ static uint32_t pack_word(float lo, float hi) {
    return bit_cast_to<uint32_t>(__floats2half2_rn(lo, hi));
  }
};

template <typename T, CachePolicy P>
__device__ __forceinline__ float load_element(const T* p) {
  using Io = ElementIo<T>;
  return Io::from_bits(load_raw<P>(reinterpret_cast<const typename Io::Bits*>(p)));
}

template <typename T, CachePolicy P>
__device__ __forceinline__ void store_element(T* p, float value) {
  using Io = ElementIo<T>;
  store_raw<P>(reinterpret_cast<typename Io::Bits*>(p), Io::to_bits(value));
}

// A 16-byte vector of -inf elements of type T.
template <typename T>
__device__ __forceinline__ uint4 neg_inf_vector() {
  constexpr uint32_t w = ElementIo<T>::kNegInfWord;
  return make_uint4(w, w, w, w);
}

// Elements of type T before the first 16-byte boundary at or after p, capped at n. p must be
// aligned to sizeof(T) (the host launchers check the base pointer; row offsets are whole elements).
template <typename T>
__device__ __forceinline__ int64_t head_to_alignment(const T* p, int64_t n) {
  const uint32_t misaligned = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) & 15u);
  const int64_t head = misaligned == 0 ? 0 : static_cast<int64_t>((16u - misaligned) / sizeof(T));
  return head < n ? head : n;
}

}  // namespace dpo::cuda
