// CPU kernels of the torch.ops.bnext operators, parallel with at::parallel_for (OpenMP).
//
// Each memory layout of batch_norm_layout.h has its own loops and no conversion copy.
//
// Inner loops use at::vec SIMD (AVX-512 or AVX2, chosen at build time). Sums run in the compute
// type (float32 for float32, bfloat16 and float16 input) in short stretches and accumulate in
// float64. Statistics use sums shifted by a value near the channel's mean (no E[x^2] - E[x]^2
// cancellation), redone around the mean where the first values were too far from it; every part
// of a reduction shifts a channel by the same value, so parts add their sums. Reductions use a
// partition fixed by the shape alone and add the parts in a fixed order, so results do not depend
// on the number of threads.
#include "../batch_norm_checks.h"
#include "../batch_norm_layout.h"
#include "../batch_norm_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace bnext::cpu {
namespace {

using at::Tensor;

// Sums run in the compute type (float for float32) for this many terms per accumulator, then are
// added into the accumulation type (double): fast loops, no long float sums.
constexpr int64_t kFlushEvery = 8;
// The same down the rows of a rows tensor (add_rows, add_rows_in_order). Their flush, two
// conversions and two double additions per vector of lanes, had taken a quarter of the statistics'
// vector operations at 8 rows (three per vector and row). At 32 rows, in-process A/B against 8 on
// an AMD EPYC Zen 4 guest (float32 channels_last, 2 and 1 threads): training forward 0.90-0.96x
// the time, backward 0.88-0.97x; the suite's errors against float64 came out the same on every
// shape of its accuracy tests (planar stretches of 32 terms, by contrast, raised the error of
// few-row (N, C) shapes 1.7-3.6x: those stay at kFlushEvery).
constexpr int64_t kRowFlushEvery = 32;
// Rows ahead that the rows reductions prefetch (rows_prefetched).
constexpr int64_t kPrefetchRowsAhead = 8;
// Values below which a parallel loop is not worth splitting (torch's own grain size).
constexpr int64_t kGrainValues = 32768;
// Channels-last rows are split into at most this many parts, each reduced by one task; each part
// has at least kMinPartValues values (rows x channels) and kMinPartRows rows, so that merging the
// parts costs little next to reducing them.
constexpr int64_t kMaxParts = 64;
constexpr int64_t kMinPartValues = 16384;
constexpr int64_t kMinPartRows = 64;
// Outputs of at least kStreamBytes and less than kStreamMaxBytes (float32, bfloat16, float16) are
// written with streaming (non-temporal) stores: they skip reading each output line before writing
// it, which costs a third of a copy's memory traffic. The output then leaves the cache: whatever
// reads it next (the following layer) reads it from memory. Measured on this machine's benchmark:
// 3 MB layers gained, and 1.6 MB ones (8x256x14x14 channels_last: eval on 1 thread 0.125 -> 0.097
// ms, backward on 2 threads 0.211 -> 0.177 ms); 1 MB ones were mixed (256x1024: backward gained,
// eval on 2 threads lost 0.028 -> 0.039 ms). From kStreamMaxBytes on, glibc (whose dynamic mmap
// threshold stops at 32 MB) maps every output afresh; the kernel zeroes each new page into cache
// on first touch, and a streaming store over those dirty lines writes them back twice: measured
// 1.4x slower than ordinary stores on 49 and 98 MB outputs. Eval also keeps ordinary stores where
// its input and output fit in the caches near the threads (eval_streams).
constexpr int64_t kStreamBytes = int64_t(3) << 19;  // 1.5 MB
constexpr int64_t kStreamMaxBytes = int64_t(32) << 20;
// Channels of a rows tensor reduced together by one task.
constexpr int64_t kChannelBlock = 2048;

// A per-channel tensor (C values of any shape) as one strided run: its data and stride.
Tensor channel_run(const Tensor& t) {
  return t.dim() <= 1 || t.is_contiguous() ? t : t.contiguous();
}

int64_t channel_stride(const Tensor& run) {
  return run.dim() == 1 ? run.stride(0) : 1;
}

// Channels per block of the per-channel loops (for_channel_blocks): a block's float64 values stay
// in L1. Wide inputs with few rows have more per-channel values than data: arrays of float64 per
// tensor cost (2, 65536) more than its kernels.
constexpr int64_t kParamBlock = 256;
// Blocks below which a per-channel loop runs on one thread.
constexpr int64_t kParamBlockGrain = 8;

// body(c0, count) over the channels in blocks of at most kParamBlock, in parallel for many blocks.
template <typename Body>
void for_channel_blocks(int64_t channels, const Body& body) {
  const int64_t num_blocks = (channels + kParamBlock - 1) / kParamBlock;
  at::parallel_for(0, num_blocks, kParamBlockGrain, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t c0 = block * kParamBlock;
      body(c0, std::min(kParamBlock, channels - c0));
    }
  });
}

// A per-channel tensor (or its absence: every value `fill`) read and written by blocks of
// channels as float64. A tensor that is not one strided run is read from a contiguous copy, and
// written back by commit().
class ChannelValues {
 public:
  ChannelValues(const std::optional<Tensor>& t, double fill)
      : given_(is_given(t)), fill_(fill), original_(given_ ? *t : Tensor()) {
    if (given_) {
      run_ = channel_run(*t);
      stride_ = channel_stride(run_);
    }
  }

  // Values [c0, c0 + count) into out.
  void read(int64_t c0, int64_t count, double* out) const {
    if (!given_) {
      std::fill(out, out + count, fill_);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run_.scalar_type(), "bnext_read_channels", [&] {
      const scalar_t* data = run_.const_data_ptr<scalar_t>() + c0 * stride_;
      if (stride_ == 1) {  // the usual case, a loop that vectorizes
        std::copy(data, data + count, out);
        return;
      }
      for (int64_t j = 0; j < count; ++j) {
        out[j] = static_cast<double>(data[j * stride_]);
      }
    });
  }

  // values[0, count) into channels [c0, c0 + count), in the tensor's dtype.
  void write(int64_t c0, int64_t count, const double* values) const {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, run_.scalar_type(), "bnext_write_channels", [&] {
      scalar_t* data = run_.mutable_data_ptr<scalar_t>() + c0 * stride_;
      if (stride_ == 1) {
        std::copy(values, values + count, data);
        return;
      }
      for (int64_t j = 0; j < count; ++j) {
        data[j * stride_] = static_cast<scalar_t>(values[j]);
      }
    });
  }

  // After write(): the values into the tensor itself, where they went to a copy.
  void commit() const {
    if (given_ && !run_.is_same(original_)) {
      original_.copy_(run_);
    }
  }

 private:
  bool given_;
  double fill_;
  Tensor original_;
  Tensor run_;
  int64_t stride_ = 1;
};

// Every value of `values` (channels), converted to T: for loops over channels that read them
// one by one (a read per channel dispatches on the dtype).
template <typename T>
std::vector<T> all_channels(const ChannelValues& values, int64_t channels) {
  std::vector<T> out(channels);
  for_channel_blocks(channels, [&](int64_t c0, int64_t n) {
    double block[kParamBlock];
    values.read(c0, n, block);
    std::copy(block, block + n, out.data() + c0);
  });
  return out;
}

template <typename scalar_t>
using OpVec = at::vec::Vectorized<at::opmath_type<scalar_t>>;

// Type the sums accumulate in, past short stretches in the compute type: float64 for every input
// type (torch's CPU accumulation type is float32 for bfloat16 and float16, whose long sums then
// lose several float32 ulps; float64 makes them as accurate as float32 input's).
template <typename scalar_t>
using acc_type = double;

template <typename scalar_t>
C10_ALWAYS_INLINE OpVec<scalar_t> load_vec(const scalar_t* data) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    return OpVec<scalar_t>::loadu(data);
  } else {
    OpVec<scalar_t> values;
    at::vec::load_to_float(data, values);
    return values;
  }
}

// Two compute-type vectors, for passes that store a reduced type two vectors at a time
// (kStoresPairs).
template <typename scalar_t>
using VecPair = at::vec::VectorizedN<at::opmath_type<scalar_t>, 2>;

template <typename T>
struct IsVecPair : std::false_type {};
template <typename T>
struct IsVecPair<at::vec::VectorizedN<T, 2>> : std::true_type {};

// Whether an elementwise pass stores scalar_t two compute-type vectors at a time: bfloat16 and
// float16, whose vectors of floats narrow to half their width. On AVX2 the pair's 16 values
// convert together into one 32-byte store, as torch's kernels store them; one 16-byte store per
// vector took 1.2-1.4x the time of a bfloat16 eval on 2 threads of an AMD EPYC (Zen 3):
// 8x512x28x28 0.64 -> 0.46 ms, 32x128x1000 0.93 -> 0.67 ms, 8x2048x7x7 (in memory order) 0.275 ->
// 0.226 ms; training forward and backward 5-11% faster. On AVX-512 the pair's 32 values fill one
// 64-byte line (bfloat16 in one vcvtne2ps2bf16 rather than two conversions): on an AMD EPYC (Zen
// 4), alternating processes of the two builds, old time / new, bfloat16 eval 1.22-1.47 on 2 threads
// (8x64x56x56 either layout, 8x1024x14x14 and 8x2048x7x7 channels_last, 8x512x7x7) and 1.19-1.36
// on 1 thread, training forward 1.03-1.14 and backward 1.06-1.19 on 2 threads; float16 eval 1.05-1.23.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <typename scalar_t>
constexpr bool kStoresPairs = !std::is_same_v<scalar_t, at::opmath_type<scalar_t>>;
#else
template <typename scalar_t>
constexpr bool kStoresPairs = false;
#endif

// The 2 x vector size values at `data`, as two compute-type vectors.
template <typename scalar_t>
C10_ALWAYS_INLINE VecPair<scalar_t> load_pair(const scalar_t* data) {
  VecPair<scalar_t> pair;
  pair[0] = load_vec(data);
  pair[1] = load_vec(data + OpVec<scalar_t>::size());
  return pair;
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// 32 bytes at `data`, streaming when `stream` is set and the destination is aligned.
C10_ALWAYS_INLINE void store_packed(void* data, const __m256i& packed, bool stream) {
  if (stream && reinterpret_cast<uintptr_t>(data) % sizeof(__m256i) == 0) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(data), packed);
  } else {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(data), packed);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
// The lanes of `values` that vcvtneps2bf16 and vcvtne2ps2bf16 may not convert as torch does (NaN
// and denormal lanes): they round finite values and infinities the same way (to nearest even), but
// flush denormals to zero and keep NaN payloads. One instruction where torch's rounding takes ten.
C10_ALWAYS_INLINE __mmask16 nan_or_denormal_lanes(const __m512& values) {
  constexpr int kNanOrDenormal = 0x01 | 0x20 | 0x80;  // quiet NaN, denormal, signaling NaN
  return _mm512_fpclass_ps_mask(values, kNanOrDenormal);
}
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// Two compute-type vectors of a reduced type converted to it together, first's values then
// second's, bit for bit as torch converts (narrow's twin for pairs).
template <typename scalar_t>
C10_ALWAYS_INLINE at::vec::Vectorized<scalar_t> narrow_pair(const OpVec<scalar_t>& first,
                                                            const OpVec<scalar_t>& second) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    // Pairs holding a NaN or a denormal take torch's conversion (nan_or_denormal_lanes).
    if ((nan_or_denormal_lanes(first) | nan_or_denormal_lanes(second)) == 0) {
      return std::bit_cast<__m512i>(_mm512_cvtne2ps_pbh(second, first));
    }
  }
#endif
  return at::vec::convert_from_float<scalar_t>(first, second);
}
#endif

// Two vectors' values at `data` (kStoresPairs only): one conversion (narrow_pair) and one store
// (32 bytes on AVX2, a 64-byte line on AVX-512), streaming when `stream` is set and the
// destination is aligned (on AVX-512, to a line or half a line).
template <typename scalar_t>
C10_ALWAYS_INLINE void store_pair(scalar_t* data, const OpVec<scalar_t>& first, const OpVec<scalar_t>& second,
                                  bool stream) {
  static_assert(kStoresPairs<scalar_t>, "pairs are stored only where kStoresPairs");
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i packed = narrow_pair<scalar_t>(first, second);
  const uintptr_t line_offset = reinterpret_cast<uintptr_t>(data) % sizeof(__m512i);
  if (stream && line_offset == 0) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(data), packed);
  } else if (stream && line_offset == sizeof(__m256i)) {
    // A pair across two lines (rows of 16 values more than a multiple of 32, as every other row of
    // 48 channels): each half streamed on its own, as single vectors are, so that no line is left
    // partly streamed.
    _mm256_stream_si256(reinterpret_cast<__m256i*>(data), _mm512_castsi512_si256(packed));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(data) + 1, _mm512_extracti64x4_epi64(packed, 1));
  } else {
    _mm512_storeu_si512(data, packed);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  store_packed(data, narrow_pair<scalar_t>(first, second), stream);
#endif
}

// Whether elementwise passes (map_run, map_plane_blocks) take bfloat16 two vectors at a time in
// an order of their own (load_interleaved, store_interleaved), their lanes' coefficients alike or
// picked by lane: on AVX2, widening 16 values in order takes two conversions and two shifts and
// narrowing them back a cross-lane permute, where the interleaved order takes two unpacks and no
// permute. In a standalone loop of y = (x - c) * s + t on an AMD EPYC (Zen 3), 1 thread, data in
// L2: 4.8 -> 5.9-6.5 values/ns.
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
template <typename scalar_t>
constexpr bool kInterleavedPairs = std::is_same_v<scalar_t, at::BFloat16>;

// The 16 bfloat16 values at `data` as two float vectors: the first holds values 0-3 and 8-11, the
// second 4-7 and 12-15 (the unpacks work within each 128-bit half).
C10_ALWAYS_INLINE VecPair<at::BFloat16> load_interleaved(const at::BFloat16* data) {
  const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(data));
  const __m256i zero = _mm256_setzero_si256();
  VecPair<at::BFloat16> pair;
  pair[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, packed));
  pair[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, packed));
  return pair;
}

// Float lanes rounded to the nearest bfloat16, ties to even, in the low half of each 32-bit lane
// (NaN excepted: a NaN's payload may round to infinity).
C10_ALWAYS_INLINE __m256i round_to_bfloat16(const __m256& values) {
  const __m256i bits = _mm256_castps_si256(values);
  const __m256i lowest_kept = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i half_below = _mm256_add_epi32(lowest_kept, _mm256_set1_epi32(0x7fff));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, half_below), 16);
}

// load_interleaved's counterpart: the pair's values back in order at `data`, converted bit for bit
// as torch converts, streaming when `stream` is set and the destination is aligned. A pair holding
// a NaN takes torch's conversion, and a permute back to this order.
C10_ALWAYS_INLINE void store_interleaved(at::BFloat16* data, const __m256& first, const __m256& second, bool stream) {
  __m256i packed;
  if (C10_LIKELY(_mm256_movemask_ps(_mm256_cmp_ps(first, second, _CMP_UNORD_Q)) == 0)) {
    // packus takes the low halves of first's and second's lanes in turn, 128 bits at a time: the
    // values' own order.
    packed = _mm256_packus_epi32(round_to_bfloat16(first), round_to_bfloat16(second));
  } else {
    // torch's conversion gives first's 8 values, then second's: values 0-3, 8-11, 4-7, 12-15.
    packed = _mm256_permute4x64_epi64(at::vec::convert_from_float<at::BFloat16>(first, second), 0xd8);
  }
  store_packed(data, packed, stream);
}
#else
template <typename scalar_t>
constexpr bool kInterleavedPairs = false;
#endif

#if defined(CPU_CAPABILITY_AVX512)
using NarrowVec = __m256i;
#elif defined(CPU_CAPABILITY_AVX2)
using NarrowVec = __m128i;
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// One compute-type vector of a reduced type (bfloat16, float16) converted to it, as one integer
// vector of half the width, bit for bit as torch converts.
template <typename scalar_t>
C10_ALWAYS_INLINE NarrowVec narrow(const OpVec<scalar_t>& values) {
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    // Vectors holding a NaN or a denormal take torch's conversion (nan_or_denormal_lanes).
    if (nan_or_denormal_lanes(values) == 0) {
      return std::bit_cast<__m256i>(_mm512_cvtneps_pbh(values));
    }
  }
#endif
  const at::vec::Vectorized<scalar_t> converted = at::vec::convert_from_float<scalar_t>(values, values);
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castsi512_si256(converted);
#else
  return _mm256_castsi256_si128(converted);
#endif
}
#endif

template <typename scalar_t>
C10_ALWAYS_INLINE void store_vec(scalar_t* data, const OpVec<scalar_t>& values) {
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    values.store(data);
  } else {
    // One plain store of the converted half-width vector (a partial Vectorized::store is a masked
    // store, much slower).
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(data), narrow<scalar_t>(values));
#elif defined(CPU_CAPABILITY_AVX2)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(data), narrow<scalar_t>(values));
#else
    at::vec::convert_from_float<scalar_t>(values, values).store(data, OpVec<scalar_t>::size());
#endif
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Mask of a 16-lane vector's first `count` lanes.
inline __mmask16 leading_lanes_mask(int64_t count) {
  return static_cast<__mmask16>((1u << count) - 1);
}
#endif

// The first `count` values at `data` (count <= the vector size; the rest are zero).
template <typename scalar_t>
C10_ALWAYS_INLINE OpVec<scalar_t> load_vec(const scalar_t* data, int64_t count) {
  using Vec = OpVec<scalar_t>;
  if (count == Vec::size()) {
    return load_vec(data);
  }
  if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    return Vec::loadu(data, count);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    const __m256i narrow_values = _mm256_maskz_loadu_epi16(leading_lanes_mask(count), data);
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(narrow_values), 16));
    } else {
      return _mm512_cvtph_ps(narrow_values);
    }
#else
    return std::get<0>(at::vec::convert_to_float(at::vec::Vectorized<scalar_t>::loadu(data, count)));
#endif
  }
}

// The first `count` values at `data`, and `fill` in the other lanes.
template <typename scalar_t>
C10_ALWAYS_INLINE OpVec<scalar_t> load_vec_or(const scalar_t* data, int64_t count, at::opmath_type<scalar_t> fill) {
  using Vec = OpVec<scalar_t>;
  if (count == Vec::size()) {
    return load_vec(data);
  }
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), leading_lanes_mask(count), data);
  }
#endif
  return Vec::set(Vec(fill), load_vec(data, count), count);
}

// Stores the first `count` values of `values` (count <= the vector size).
template <typename scalar_t>
C10_ALWAYS_INLINE void store_vec(scalar_t* data, const OpVec<scalar_t>& values, int64_t count) {
  if (count == OpVec<scalar_t>::size()) {
    store_vec(data, values);
  } else if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>) {
    values.store(data, count);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_mask_storeu_epi16(data, leading_lanes_mask(count), narrow<scalar_t>(values));
#else
    at::vec::convert_from_float<scalar_t>(values, values).store(data, count);
#endif
  }
}

// One value as the compute type, or one vector of them, as T asks: lets a loop body written once
// serve the vector loop and its scalar tail.
template <typename T, typename scalar_t>
T load_as(const scalar_t* data) {
  if constexpr (std::is_same_v<T, OpVec<scalar_t>>) {
    return load_vec(data);
  } else if constexpr (IsVecPair<T>::value) {
    return load_pair(data);
  } else {
    return static_cast<T>(*data);
  }
}

// The same for `count` values (count 1 for a single value): a vector's lanes past count hold `fill`.
template <typename T, typename scalar_t>
T load_as(const scalar_t* data, int64_t count, at::opmath_type<scalar_t> fill = 0) {
  if constexpr (std::is_same_v<T, OpVec<scalar_t>>) {
    return load_vec_or(data, count, fill);
  } else {
    return static_cast<T>(*data);
  }
}

// Totals per SIMD lane in the accumulation type, of vectors in the compute type (float32 lanes
// widened to float64).
template <typename scalar_t>
struct LaneTotals {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = OpVec<scalar_t>;
  using AccVec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kLanes = Vec::size();
  static constexpr int64_t kParts = kLanes / AccVec::size();

  std::array<AccVec, kParts> parts;

  LaneTotals() { parts.fill(AccVec(acc_t(0))); }

  void add(const Vec& lanes) {
    const std::array<AccVec, kParts> wide = widen(lanes);
    for (int64_t part = 0; part < kParts; ++part) {
      parts[part] = parts[part] + wide[part];
    }
  }

  // Pairwise across lanes, in a fixed order: lane k takes lane k + kLanes / 2, then k + kLanes / 4,
  // and so on. In registers where there are SIMD halves to add: through an array on the stack, each
  // step's loads waited on the previous step's stores, a tenth of the backward's sums of 7x7 planes.
  C10_ALWAYS_INLINE acc_t total() const {
#if defined(CPU_CAPABILITY_AVX512)
    __m512d all = parts[0];
    if constexpr (kParts == 2) {
      all = _mm512_add_pd(all, parts[1]);
    }
    const __m256d half = _mm256_add_pd(_mm512_castpd512_pd256(all), _mm512_extractf64x4_pd(all, 1));
    const __m128d quarter = _mm_add_pd(_mm256_castpd256_pd128(half), _mm256_extractf128_pd(half, 1));
    return _mm_cvtsd_f64(_mm_add_sd(quarter, _mm_unpackhi_pd(quarter, quarter)));
#elif defined(CPU_CAPABILITY_AVX2)
    __m256d all = parts[0];
    if constexpr (kParts == 2) {
      all = _mm256_add_pd(all, parts[1]);
    }
    const __m128d half = _mm_add_pd(_mm256_castpd256_pd128(all), _mm256_extractf128_pd(all, 1));
    return _mm_cvtsd_f64(_mm_add_sd(half, _mm_unpackhi_pd(half, half)));
#else
    alignas(64) acc_t totals[kLanes];
    for (int64_t part = 0; part < kParts; ++part) {
      parts[part].store(totals + part * AccVec::size());
    }
    for (int64_t width = kLanes / 2; width > 0; width /= 2) {
      for (int64_t k = 0; k < width; ++k) {
        totals[k] += totals[k + width];
      }
    }
    return totals[0];
#endif
  }

  // `lanes` converted to the accumulation type: itself, or its low and high halves.
  static C10_ALWAYS_INLINE std::array<AccVec, kParts> widen(const Vec& lanes) {
    if constexpr (kParts == 1) {
      return {lanes};
    } else {
      static_assert(kParts == 2, "lanes widen to two vectors");
      return widen_halves(lanes);
    }
  }

 private:
  static C10_ALWAYS_INLINE std::array<AccVec, 2> widen_halves(const Vec& lanes) {
#if defined(CPU_CAPABILITY_AVX512)
    const __m512 values = lanes;
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(values), 1));
    return {AccVec(_mm512_cvtps_pd(_mm512_castps512_ps256(values))), AccVec(_mm512_cvtps_pd(high))};
#elif defined(CPU_CAPABILITY_AVX2)
    const __m256 values = lanes;
    return {AccVec(_mm256_cvtps_pd(_mm256_castps256_ps128(values))),
            AccVec(_mm256_cvtps_pd(_mm256_extractf128_ps(values, 1)))};
#else
    alignas(64) opmath_t values[kLanes];
    lanes.store(values);
    alignas(64) acc_t wide[kLanes];
    for (int64_t k = 0; k < kLanes; ++k) {
      wide[k] = static_cast<acc_t>(values[k]);
    }
    return {AccVec::loadu(wide), AccVec::loadu(wide + AccVec::size())};
#endif
  }
};

// a * b + c for values or vectors, as one fused multiply-add wherever the target has them. Left to
// the compiler, whether a * b + c fuses depended on the code around it: on AVX2, a float16 input's
// weight gradient came out one ulp off the same values' in float32 (summed in runs of images).
template <typename T>
C10_ALWAYS_INLINE T multiply_add(const T& a, const T& b, const T& c) {
  if constexpr (std::is_arithmetic_v<T>) {
#if defined(__FMA__)
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
  } else {
    return at::vec::fmadd(a, b, c);
  }
}

// The centered form of the normalize passes, (x - center) * scale + shift, the difference first:
// values equal to the center map exactly to the shift.
template <typename T>
C10_ALWAYS_INLINE T centered_affine(const T& x, const T& center, const T& scale, const T& shift) {
  return multiply_add(x - center, scale, shift);
}

// centered_affine where kCentered, and x * scale + shift where every center is 0 (folding_affine):
// the same values, as x - 0 is x, with one vector operation fewer, the load folded into the
// multiply-add.
template <bool kCentered, typename T>
C10_ALWAYS_INLINE T affine_map(const T& x, const T& center, const T& scale, const T& shift) {
  if constexpr (kCentered) {
    return centered_affine(x, center, scale, shift);
  } else {
    return multiply_add(x, scale, shift);
  }
}

// body(std::bool_constant<flag>()): code compiled for either value of a flag.
template <typename Body>
C10_ALWAYS_INLINE void with_flag(bool flag, const Body& body) {
  if (flag) {
    body(std::true_type());
  } else {
    body(std::false_type());
  }
}

// body(std::bool_constant<centered>()): a pass compiled for centered coefficients or for folded ones.
template <typename Body>
C10_ALWAYS_INLINE void with_centering(bool centered, const Body& body) {
  with_flag(centered, body);
}

// Whether any of values[0, n) is other than 0 (or NaN): a pass over them must subtract.
template <typename T>
bool any_nonzero(const T* values, int64_t n) {
  return std::any_of(values, values + n, [](T value) { return !(value == 0); });
}

// Independent accumulators per sum in pair_sums, to keep several vector adds in flight: as many as
// the vector registers hold. AVX-512 has 32, and takes 4 per sum; AVX2's 16 took 4 per sum only by
// keeping them on the stack, a store and a reload per add (AMD EPYC, Zen 3, 2 threads: backward of
// 8x2048x7x7 0.62 -> 0.50 ms with 2 per sum, 8x512x7x7 1 thread 0.22 -> 0.16 ms; planes of 56x56
// at par).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kSumChains = 4;
#else
constexpr int64_t kSumChains = 2;
#endif

// The sum of a pair_sums accumulator's chains, pairwise.
template <typename Vec>
C10_ALWAYS_INLINE Vec sum_chains(const std::array<Vec, kSumChains>& lanes) {
  if constexpr (kSumChains == 4) {
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  } else {
    return lanes[0] + lanes[1];
  }
}

// The terms of values [from, to) of a run starting at `begin`, one by one (a run's last values,
// too few for a partial vector), summed in the compute type and added to the two tails.
template <typename scalar_t, typename Terms, typename acc_t>
C10_ALWAYS_INLINE void add_values_one_by_one(const Terms& terms, int64_t begin, int64_t from, int64_t to,
                                             acc_t& first_tails, acc_t& second_tails) {
  using opmath_t = at::opmath_type<scalar_t>;
  opmath_t first_tail = 0;
  opmath_t second_tail = 0;
  for (int64_t j = from; j < to; ++j) {
    terms(begin + j, 1, first_tail, second_tail);
  }
  first_tails += first_tail;
  second_tails += second_tail;
}

// pair_sums over runs of kWhole whole vectors and fewer than one vector more, fewer whole vectors
// than kSumChains: whole vector k of each run goes to chain k, as in pair_sums' last step of a
// run, with no loop within runs and every accumulator a register. 7x7 planes (three vectors and one
// value with AVX-512) went through pair_sums' general loop, whose chains live on the stack: the
// backward sums of 8x512x7x7 took 80 ns per channel there (104 ns with the lambda's captures by
// reference, before 85a7dca), 50 ns here (AMD EPYC Zen 4, one thread, in L2).
template <int64_t kWhole, typename scalar_t, typename Terms>
auto short_run_pair_sums(int64_t num_runs, int64_t run_stride, int64_t length, const Terms& terms) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  static_assert(kWhole < kSumChains && kWhole <= 3, "a short run has a chain for each whole vector");
  const Vec zero(opmath_t(0));
  Vec first0 = zero, first1 = zero, first2 = zero, first_partial = zero;
  Vec second0 = zero, second1 = zero, second2 = zero, second_partial = zero;
  LaneTotals<scalar_t> first_totals;
  LaneTotals<scalar_t> second_totals;
  acc_t first_tails = 0;
  acc_t second_tails = 0;
  const auto flush = [&] {
    first_totals.add(((first0 + first1) + first2) + first_partial);
    second_totals.add(((second0 + second1) + second2) + second_partial);
    first0 = first1 = first2 = first_partial = second0 = second1 = second2 = second_partial = zero;
  };
  constexpr int64_t vec_length = kWhole * kLanes;
  const int64_t tail = length - vec_length;
  const bool partial_tail = 2 * tail >= kLanes;
  // Runs of only single values add no vector terms, and never flush.
  const int64_t flush_at = kWhole > 0 || partial_tail ? kFlushEvery : -1;
  int64_t steps = 0;
  for (int64_t begin = 0, end = num_runs * run_stride; begin < end; begin += run_stride) {
    if constexpr (kWhole > 0) {
      terms(begin, kLanes, first0, second0);
    }
    if constexpr (kWhole > 1) {
      terms(begin + kLanes, kLanes, first1, second1);
    }
    if constexpr (kWhole > 2) {
      terms(begin + 2 * kLanes, kLanes, first2, second2);
    }
    if (partial_tail) {
      terms(begin + vec_length, tail, first_partial, second_partial);
    } else if (tail > 0) {
      add_values_one_by_one<scalar_t>(terms, begin, vec_length, length, first_tails, second_tails);
    }
    if (++steps == flush_at) {
      flush();
      steps = 0;
    }
  }
  flush();
  return std::make_pair(first_totals.total() + first_tails, second_totals.total() + second_tails);
}

// Two sums over the values of `num_runs` runs of `length` values, run r starting at r * run_stride
// (the planes of one channel). SIMD lanes in the compute type (float for float32) take at most
// kFlushEvery terms each, then are added lane by lane into totals of the accumulation type
// (double), which are summed across lanes once, at the end. The lanes carry over from one run to
// the next, so that short planes (7x7: three vectors and one value) share a flush.
//
// terms(i, count, first, second) adds the two terms of the `count` values from i to the
// accumulators: a whole vector of them, its first `count` lanes (the others must add zero), or a
// single value (count 1) when the accumulators are scalars. A run's last values, fewer than a
// vector, go in as one partial vector when they fill at least half of one (5x5 planes: one
// vector and nine values; channel statistics 13 -> 9 us on (16, 128, 5, 5)), and one by one
// otherwise: a partial vector for the last value of a 7x7 plane, or the last four of a 14x14
// one, made their statistics 15-20% slower.
template <typename scalar_t, typename Terms>
auto pair_sums(int64_t num_runs, int64_t run_stride, int64_t length, const Terms& terms) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  using Vec = OpVec<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  constexpr int64_t kStep = kLanes * kSumChains;
  if (length < kStep) {  // fewer whole vectors than chains
    switch (length / kLanes) {
      case 0:
        return short_run_pair_sums<0, scalar_t>(num_runs, run_stride, length, terms);
      case 1:
        return short_run_pair_sums<std::min<int64_t>(1, kSumChains - 1), scalar_t>(num_runs, run_stride, length,
                                                                                   terms);
      case 2:
        return short_run_pair_sums<std::min<int64_t>(2, kSumChains - 1), scalar_t>(num_runs, run_stride, length,
                                                                                   terms);
      default:
        return short_run_pair_sums<std::min<int64_t>(3, kSumChains - 1), scalar_t>(num_runs, run_stride, length,
                                                                                   terms);
    }
  }

  LaneTotals<scalar_t> first_totals;
  LaneTotals<scalar_t> second_totals;
  acc_t first_tails = 0;
  acc_t second_tails = 0;
  std::array<Vec, kSumChains> first_lanes;
  std::array<Vec, kSumChains> second_lanes;
  first_lanes.fill(Vec(opmath_t(0)));
  second_lanes.fill(Vec(opmath_t(0)));
  Vec first_partial(opmath_t(0));  // the runs' partial vectors
  Vec second_partial(opmath_t(0));
  int64_t steps = 0;  // terms in each lane since the last flush
  const auto flush = [&] {
    first_totals.add(sum_chains(first_lanes) + first_partial);
    second_totals.add(sum_chains(second_lanes) + second_partial);
    first_lanes.fill(Vec(opmath_t(0)));
    second_lanes.fill(Vec(opmath_t(0)));
    first_partial = second_partial = Vec(opmath_t(0));
    steps = 0;
  };
  const auto end_step = [&] {
    if (++steps == kFlushEvery) {
      flush();
    }
  };
  const int64_t vec_length = length - length % kLanes;
  const int64_t tail = length - vec_length;
  const bool partial_tail = 2 * tail >= kLanes;
  for (int64_t run = 0; run < num_runs; ++run) {
    const int64_t begin = run * run_stride;
    int64_t i = 0;
    for (; i + kStep <= vec_length; i += kStep) {
      for (int64_t k = 0; k < kSumChains; ++k) {
        terms(begin + i + k * kLanes, kLanes, first_lanes[k], second_lanes[k]);
      }
      end_step();
    }
    // Fewer than kSumChains vectors left (one into each chain) and the partial one: one more step.
    const int64_t whole = (vec_length - i) / kLanes;
    for (int64_t k = 0; k < kSumChains - 1; ++k) {  // a constant trip count keeps the lanes in registers
      if (k < whole) {
        terms(begin + i + k * kLanes, kLanes, first_lanes[k], second_lanes[k]);
      }
    }
    if (partial_tail) {
      terms(begin + vec_length, tail, first_partial, second_partial);
    }
    if (whole > 0 || partial_tail) {
      end_step();
    }
    if (!partial_tail && tail > 0) {
      add_values_one_by_one<scalar_t>(terms, begin, vec_length, length, first_tails, second_tails);
    }
  }
  flush();
  return std::make_pair(first_totals.total() + first_tails, second_totals.total() + second_tails);
}

// Values whose mean a channel's sums are shifted by, at most (the first of a plane, or the first
// rows): their mean lies about half a standard deviation from the channel's. 16 cost 7x7 planes
// more than 10% of the training forward's time.
constexpr int64_t kShiftValues = 4;

// A value near the mean of the `count` values at `values` (count >= 1): their first plus the
// mean of their differences from it (exact for a constant channel), in the compute type. Sums of
// squares around it barely cancel; around the first value alone, which can lie several standard
// deviations away, the float32 lanes' rounding grew several-fold (invstd 3e-7 off on 7x7 planes).
template <typename opmath_t, typename acc_t>
opmath_t shift_from(acc_t first, acc_t offsets, int64_t count) {
  // A multiply in the common case (exact: kShiftValues is a power of two): a division would delay
  // the channel's first sums.
  const acc_t mean_offset =
      count == kShiftValues ? offsets * (acc_t(1) / kShiftValues) : offsets / static_cast<acc_t>(count);
  return static_cast<opmath_t>(first + mean_offset);
}

template <typename scalar_t>
at::opmath_type<scalar_t> shift_of(const scalar_t* values, int64_t count) {
  using acc_t = acc_type<scalar_t>;
  const acc_t first = static_cast<acc_t>(values[0]);
  acc_t offsets = 0;
  for (int64_t i = 1; i < count; ++i) {
    offsets += static_cast<acc_t>(values[i]) - first;
  }
  return shift_from<at::opmath_type<scalar_t>>(first, offsets, count);
}

// Whether sums shifted by a value more than twice the standard deviation away from the mean
// (their first values were outliers) lose too much to cancellation: their squares are then mostly
// the shift's offset, which the compute type's lanes round. Sums around the mean are redone.
// Normal data has its first kShiftValues values' mean that far off in 6 channels in 100000.
// sum^2 / count^2 is the squared offset, sum_sq / count the squared offset plus the variance: an
// offset of 2 standard deviations is 0.8 of their sum.
constexpr double kMaxOffsetShare = 0.8;

template <typename acc_t>
bool shift_too_far(acc_t count, acc_t sum, acc_t sum_sq) {
  return sum * sum > acc_t(kMaxOffsetShare) * count * sum_sq;
}

// Whether shift_too_far holds for any of `width` channels' sums. In vectors: as a plain loop it
// took 10% of the training forward of (2, 65536), where it checks 32768 channels per thread.
template <typename acc_t>
bool any_shift_too_far(acc_t count, int64_t width, const acc_t* sum, const acc_t* sum_sq) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kSize = Vec::size();
  const Vec factor(acc_t(kMaxOffsetShare) * count);
  Vec any(acc_t(0));
  int64_t j = 0;
  for (; j + kSize <= width; j += kSize) {
    const Vec s = Vec::loadu(sum + j);
    any = any | (s * s > factor * Vec::loadu(sum_sq + j));
  }
  if (any.zero_mask() != (1 << kSize) - 1) {
    return true;
  }
  for (; j < width; ++j) {
    if (shift_too_far(count, sum[j], sum_sq[j])) {
      return true;
    }
  }
  return false;
}

// The shifts of those of `width` channels whose shift lay too far from their mean moved to it.
template <typename opmath_t, typename acc_t>
void recenter_shifts(acc_t count, int64_t width, const acc_t* sum, const acc_t* sum_sq, opmath_t* shift) {
  for (int64_t j = 0; j < width; ++j) {
    if (shift_too_far(count, sum[j], sum_sq[j])) {
      shift[j] = static_cast<opmath_t>(moments_from_shifted_sums<acc_t>(count, shift[j], sum[j], sum_sq[j]).mean);
    }
  }
}

// Moments of channel c of a planar tensor (its planes in images [n0, n1), by default all), by
// sums shifted by a value near their mean (shift_of), or by their mean where that value was not
// near (shift_too_far; the planes are in cache again).
template <typename scalar_t>
auto planar_channel_moments(const scalar_t* x, const Layout& layout, int64_t c, int64_t n0 = 0,
                            int64_t n1 = -1) {
  using opmath_t = at::opmath_type<scalar_t>;
  using acc_t = acc_type<scalar_t>;
  n1 = n1 < 0 ? layout.batch : n1;
  const scalar_t* channel = x + (n0 * layout.channels + c) * layout.inner;
  const auto shifted_sums = [&](opmath_t shift) {
    return pair_sums<scalar_t>(
        n1 - n0, layout.channels * layout.inner, layout.inner,
        [channel, shift](int64_t i, int64_t count, auto& sum, auto& sum_sq) {
          using T = std::decay_t<decltype(sum)>;
          const T d = load_as<T>(channel + i, count, shift) - T(shift);  // shift past count: d = 0
          sum = sum + d;
          sum_sq = multiply_add(d, d, sum_sq);
        });
  };
  const acc_t count = static_cast<acc_t>((n1 - n0) * layout.inner);
  opmath_t shift = shift_of(channel, std::min(layout.inner, kShiftValues));
  auto [sum, sum_sq] = shifted_sums(shift);
  if (shift_too_far(count, sum, sum_sq)) {
    shift = static_cast<opmath_t>(moments_from_shifted_sums<acc_t>(count, shift, sum, sum_sq).mean);
    std::tie(sum, sum_sq) = shifted_sums(shift);
  }
  return moments_from_shifted_sums<acc_t>(count, shift, sum, sum_sq);
}

// Stores one value, or one vector or pair of them, converted to scalar_t: load_as's counterpart.
template <typename scalar_t, typename T>
void store_as(scalar_t* data, const T& values) {
  if constexpr (std::is_same_v<T, OpVec<scalar_t>>) {
    store_vec(data, values);
  } else if constexpr (IsVecPair<T>::value) {
    store_pair(data, values[0], values[1], /*stream=*/false);
  } else {
    *data = static_cast<scalar_t>(values);
  }
}

// Bytes one vector of the compute type occupies once stored as scalar_t: what a streaming store
// of it writes (half a cache line for bfloat16 and float16 with AVX-512, a whole one for float).
template <typename scalar_t>
constexpr uintptr_t kStoredVecBytes = OpVec<scalar_t>::size() * sizeof(scalar_t);

// store_as, with a streaming store for a vector or pair whose destination is aligned when
// `stream` is set. A reduced type streams its converted half vector; two of them in a row fill
// one line.
template <typename scalar_t, typename T>
C10_ALWAYS_INLINE void store_output(scalar_t* data, const T& values, bool stream) {
  if constexpr (IsVecPair<T>::value) {
    store_pair(data, values[0], values[1], stream);
    return;
  }
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, OpVec<scalar_t>>) {
    if (stream && reinterpret_cast<uintptr_t>(data) % kStoredVecBytes<scalar_t> == 0) {
      if constexpr (std::is_same_v<scalar_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
        _mm512_stream_ps(data, values);
#else
        _mm256_stream_ps(data, values);
#endif
        return;
      } else if constexpr (std::is_same_v<scalar_t, at::BFloat16> || std::is_same_v<scalar_t, at::Half>) {
#if defined(CPU_CAPABILITY_AVX512)
        _mm256_stream_si256(reinterpret_cast<__m256i*>(data), narrow<scalar_t>(values));
#else
        _mm_stream_si128(reinterpret_cast<__m128i*>(data), narrow<scalar_t>(values));
#endif
        return;
      }
    }
  }
#endif
  store_as(data, values);
}

// store_output for the first `count` values of `values` (count 1 for a single value): a partial
// vector is stored with ordinary stores.
template <typename scalar_t, typename T>
C10_ALWAYS_INLINE void store_output(scalar_t* data, const T& values, int64_t count, bool stream) {
  if constexpr (std::is_same_v<T, OpVec<scalar_t>>) {
    if (count < T::size()) {
      store_vec(data, values, count);
      return;
    }
  }
  store_output(data, values, stream);
}

// sum(dy) and sum(dy * (x - mean)) of channel c of a planar tensor (its planes in images [n0, n1),
// by default all). With `dx`, the same sweep stores dx = dy * dy_scale (an eval backward's input
// gradient, which needs no sums: dy is read once), by streaming stores if `stream`.
template <typename scalar_t, typename opmath_t>
auto planar_channel_grad_sums(const scalar_t* dy, const scalar_t* x, const Layout& layout, int64_t c,
                              opmath_t mean, int64_t n0 = 0, int64_t n1 = -1, scalar_t* dx = nullptr,
                              opmath_t dy_scale = 0, bool stream = false) {
  n1 = n1 < 0 ? layout.batch : n1;
  const int64_t offset = (n0 * layout.channels + c) * layout.inner;
  const auto sums = [&](auto stores_dx) {
    return pair_sums<scalar_t>(
        n1 - n0, layout.channels * layout.inner, layout.inner,
        [dy = dy + offset, x = x + offset, dx = dx == nullptr ? nullptr : dx + offset, mean, dy_scale, stream](
            int64_t i, int64_t count, auto& sum_dy, auto& sum_dy_xmu) {
          using T = std::decay_t<decltype(sum_dy)>;
          const T g = load_as<T>(dy + i, count);  // zero past count
          sum_dy = sum_dy + g;
          sum_dy_xmu = multiply_add(g, load_as<T>(x + i, count) - T(mean), sum_dy_xmu);
          if constexpr (decltype(stores_dx)::value) {
            store_output(dx + i, g * T(dy_scale), count, stream);
          }
        });
  };
  return dx ? sums(std::true_type()) : sums(std::false_type());
}

// Channels per block of an elementwise rows pass, a multiple of the vector size: wider rows are
// walked once per block, so that the block's per-channel coefficients (12 or 16 bytes a channel)
// stay in L1 rather than coming from L2 at every row. On 2 threads, (64, 8192) eval 0.092 -> 0.078
// ms, (32, 4096) 0.029 -> 0.026 ms. Narrower blocks lost where the coefficients fit anyway: with
// 512, 8x1024x14x14 channels_last eval went 0.25 -> 0.29 ms (rows walked in short stretches).
constexpr int64_t kCoefficientBlock = 2048;

// A rows pass may keep its per-channel coefficient arrays in lane order (kInterleavedPairs): each
// whole group of kLaneOrderGroup channels, counted from channel 0, in the order load_interleaved
// gives a pair's lanes (channels 0-3, 8-11, 4-7, 12-15). Its pairs of vectors then load their
// coefficients with two plain loads, and take their input and output in that order (LaneOrderPair):
// two unpacks to load 16 bfloat16 values and no permute to store them, where in channel order
// widening takes two conversions and two shifts and narrowing a cross-lane permute. The last,
// partial group stays in channel order, for the vector or values for_each_channel ends a row with.
// bfloat16 channels_last on an AMD EPYC (Zen 3), ResNet-50's layers at batch 8, old time / new:
// eval 1.06-1.14 on 2 threads and 1.08-1.36 on 1, training forward 1.03-1.08 and 1.06-1.20,
// backward 1.01-1.10 and 1.07-1.20; (4096, 256) 1.07-1.09 on 2 threads.
constexpr int64_t kLaneOrderGroup = 16;

// Whole groups of kLaneOrderGroup values of `values` in [begin, end), begin a multiple of it, put in
// lane order: the order is its own inverse (it swaps values 4-7 with 8-11).
template <typename T>
void to_lane_order(T* values, int64_t begin, int64_t end) {
  TORCH_INTERNAL_ASSERT(begin % kLaneOrderGroup == 0);
  for (int64_t g = begin; g + kLaneOrderGroup <= end; g += kLaneOrderGroup) {
    std::swap_ranges(values + g + 4, values + g + 8, values + g + 8);
  }
}

// The same for each of several per-channel arrays.
template <typename T>
void to_lane_order(std::initializer_list<std::vector<T>*> arrays, int64_t begin, int64_t end) {
  for (std::vector<T>* values : arrays) {
    to_lane_order(values->data(), begin, end);
  }
}

// for_each_channel's kind for a pair of vectors in lane order: its input comes through
// load_row, its output goes through store_row, its coefficients come from arrays in lane order.
template <typename scalar_t>
struct LaneOrderPair {};

// What a rows pass's body computes with for each kind of for_each_channel: a LaneOrderPair is a
// pair of vectors; every other kind is itself.
template <typename Kind>
struct KindValues {
  using type = Kind;
};
template <typename scalar_t>
struct KindValues<LaneOrderPair<scalar_t>> {
  using type = VecPair<scalar_t>;
};

// body(j, Kind{}) for channels [begin, end) of one row: Kind is a pair of vectors (kStoresPairs;
// a LaneOrderPair with kLaneOrder) or a vector for channels j.., then the compute type for each
// channel of the tail.
template <typename scalar_t, bool kLaneOrder = false, typename Body>
C10_ALWAYS_INLINE void for_each_channel(int64_t begin, int64_t end, const Body& body) {
  using Vec = OpVec<scalar_t>;
  int64_t j = begin;
  if constexpr (kStoresPairs<scalar_t>) {
    using Pair = std::conditional_t<kLaneOrder, LaneOrderPair<scalar_t>, VecPair<scalar_t>>;
    for (; j + 2 * Vec::size() <= end; j += 2 * Vec::size()) {
      body(j, Pair());
    }
  }
  for (; j + Vec::size() <= end; j += Vec::size()) {
    body(j, Vec());
  }
  for (; j < end; ++j) {
    body(j, at::opmath_type<scalar_t>());
  }
}

// Rows [row_begin, row_end) of channels [channel_begin, channel_end) of a rows tensor.
struct RowBlock {
  int64_t row_begin;
  int64_t row_end;
  int64_t channel_begin;
  int64_t channel_end;
};

// body(r, j, Kind{}) over a block of a rows tensor, in blocks of kCoefficientBlock channels
// (for_each_channel); vectors start at multiples of the vector size past channel_begin. With
// `lane_order` (the pass's coefficients are in lane order, and channel_begin a multiple of
// kLaneOrderGroup), bfloat16 pairs come as LaneOrderPair.
template <typename scalar_t, typename Body>
C10_ALWAYS_INLINE void for_each_row_channel(const RowBlock& rows, bool lane_order, const Body& body) {
  const auto walk = [&]<bool kLaneOrder>(std::bool_constant<kLaneOrder>) C10_ALWAYS_INLINE_ATTRIBUTE {
    for (int64_t block = rows.channel_begin; block < rows.channel_end; block += kCoefficientBlock) {
      const int64_t block_end = std::min(rows.channel_end, block + kCoefficientBlock);
      for (int64_t r = rows.row_begin; r < rows.row_end; ++r) {
        for_each_channel<scalar_t, kLaneOrder>(block, block_end, [&](int64_t c, auto kind) C10_ALWAYS_INLINE_ATTRIBUTE {
          body(r, c, kind);
        });
      }
    }
  };
  if constexpr (kInterleavedPairs<scalar_t>) {
    if (lane_order) {
      TORCH_INTERNAL_ASSERT(rows.channel_begin % kLaneOrderGroup == 0);
      walk(std::true_type{});
      return;
    }
  }
  walk(std::false_type{});
}

// Whether to stream `output` (float32, bfloat16 or float16). Streaming stores must cover whole
// aligned lines, since a partly written line makes them slow: rows of whole vectors and planes of
// whole lines stream entirely (a reduced type's half-line stores, and on AVX-512 its pairs split
// where they cross a line, follow each other and fill lines together); longer planes (at least
// kMinStreamedPlane values) stream all but a head and a tail, stored as usual (map_run).
constexpr int64_t kMinStreamedPlane = 256;

// Planes shorter than this are walked in memory order (map_plane_blocks) by an elementwise pass
// that needs no per-channel sums, rather than plane by plane. With AVX-512, planes too short to
// stream on their own. AVX2's vectors hold half as many values, so its lane picking costs twice as
// much per value and its planes leave shorter tails: on 2 threads of an AMD EPYC (Zen 3), plane by
// plane took 0.69-0.80x the time for eval of 14x14 planes (8x1024x14x14, 8x256x14x14), 0.83x for
// 12x12, 0.91x for 8x8. Once a plane's last values went out as an overlapping whole vector
// (kOverlapTails), 7x7 and 6x6 planes gained too: 0.80-0.89x for 7x7 (8x512x7x7, 8x2048x7x7,
// float32 and bfloat16), 0.85x float32 and 0.99x bfloat16 for 6x6 (32x256x6x6). Shorter planes
// lost: 1.03-1.17x for 5x5, 1.6-1.8x for 3x3.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kMinPlaneByPlane = kMinStreamedPlane;
#else
constexpr int64_t kMinPlaneByPlane = 32;
#endif

// Whether an elementwise pass that needs no per-channel sums walks a planar tensor in blocks of
// planes (map_plane_blocks) rather than plane by plane.
bool planes_in_memory_order(const Layout& layout) {
  return !layout.rows && layout.inner < kMinPlaneByPlane;
}

// Planes shorter than this many values get the elementwise pass of a training forward or backward
// in memory order (map_plane_blocks) once every channel's sums are done (short_planes_after_sums):
// four vectors of float32 with AVX-512.
constexpr int64_t kMaxPlaneAfterSums = 64;

// Whether the training forward and backward of a planar tensor sum every channel first and then
// make their elementwise pass over the tensor in memory order (short planes, kMaxPlaneAfterSums;
// planes walked in memory order at all, planes_in_memory_order), rather than channel by channel,
// each right after its sums. A channel of 7x7 planes is runs of three vectors and one value, an
// image apart, each run its own loop. On an AMD EPYC Zen 4 guest, this build against the one
// before it, medians of 3 processes each, float32 new / old: training forward of 8x512x7x7,
// 8x2048x7x7, 32x512x7x7 and 64x64x5x5 0.61-0.98 (1 and 2 threads), 128x512x7x7 (12.8 MB)
// 0.49; backward 0.58-0.88; bfloat16 7x7 0.88-0.95. In-process, with a switch between the two:
// float16 and float64 alike (0.73-0.96), and the AVX2 build too (planes of 9 to 25 values,
// 0.65-0.94). Longer planes were mixed there: float32 8x8 to 14x14 0.57-1.20 (8x256x14x14
// 1.0-1.2 on 1 thread), bfloat16 and float16 0.94-1.19.
bool short_planes_after_sums(const Layout& layout) {
  return planes_in_memory_order(layout) && layout.inner < kMaxPlaneAfterSums;
}

// Planes shorter than this many values are read as Columns from batches of as many images as a
// plane has values (planes_as_columns).
constexpr int64_t kMaxColumnPlane = 64;

// Whether a planar tensor is read as wide rows of columns (Columns): its sums then run down the
// columns rather than channel by channel, and every elementwise pass walks it in memory order,
// after the sums (otherwise each channel's pass follows its sums, while the channel is in cache).
// So are planes shorter than a vector of `lanes` values and, on builds without AVX-512, planes
// under kMaxColumnPlane values in a batch of at least as many images: channel by channel, such a
// channel is many short planes an image apart. On 2 threads of an AMD EPYC (Zen 3), float32,
// training forward and backward: 1024x512x3x3 9.5 -> 2.0 and 14.1 -> 3.5 ms, 256x256x5x5 1.15 ->
// 0.72 and 1.87 -> 0.82 ms, 64x512x7x7 0.86 -> 0.72 and 1.45 -> 1.00 ms, 16x512x3x3 0.088 -> 0.076
// and 0.104 -> 0.074 ms (bfloat16 and 1 thread alike). With fewer images each column sums few
// values, and Columns lost: forward of 8x2048x7x7 0.34 -> 0.98 ms, 32x512x7x7 0.29 -> 0.44 ms.
bool planes_as_columns(const Layout& layout, int64_t lanes) {
  if (layout.rows) {
    return false;
  }
#if defined(CPU_CAPABILITY_AVX512)
  return layout.inner < lanes;
#else
  return layout.inner < lanes || (layout.inner < kMaxColumnPlane && layout.batch >= layout.inner);
#endif
}

// `in_memory_order`: the pass writes planar output as one run (map_plane_blocks), whole lines.
bool streams(const Tensor& output, const Layout& layout, bool in_memory_order = false) {
  constexpr int64_t kLanes = at::vec::Vectorized<float>::size();
  const int64_t run = layout.rows ? layout.channels : layout.inner;
  // Rows follow each other in memory, so rows of whole vectors fill whole lines together; a plane
  // streams only the whole lines inside it.
  const int64_t line_values = 64 / static_cast<int64_t>(output.element_size());
  const bool whole_lines =
      layout.rows ? run % kLanes == 0 : (in_memory_order || run % line_values == 0 || run >= kMinStreamedPlane);
  const auto dtype = output.scalar_type();
  return (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf) && output.nbytes() >= kStreamBytes &&
         output.nbytes() < kStreamMaxBytes && whole_lines &&
         reinterpret_cast<uintptr_t>(output.const_data_ptr()) % 64 == 0;
}

// The L2 size of one core and the L3 size of the CPU this runs on, as Linux's sysfs gives them for
// its first core; where a size cannot be read, the L2 of the machine the constants above were
// measured on (2 MB, Sapphire Rapids) and no L3. sysconf's values come from cpuid, which in a VM
// describes the host: 256 MB of L3 on a 2-core AMD EPYC guest whose sysfs says 32 MB.
struct CacheSizes {
  int64_t l2 = int64_t(2) << 20;
  int64_t l3 = 0;
};

// A sysfs cache size ("512K", "32768K", "2M") in bytes, or 0.
int64_t parse_cache_size(const std::string& text) {
  char* end = nullptr;
  const int64_t value = std::strtoll(text.c_str(), &end, 10);
  if (end == text.c_str() || value < 0) {
    return 0;
  }
  const char unit = *end;
  return unit == 'K' ? value << 10 : unit == 'M' ? value << 20 : unit == 'G' ? value << 30 : value;
}

// The first word of a sysfs file, or "" where it cannot be read. C stdio, which needs no C++
// locale: reading an int through std::ifstream crashed where libstdc++ had been linked statically
// into the extension (see setup.py).
std::string read_word(const std::string& path) {
  std::FILE* file = std::fopen(path.c_str(), "r");
  if (file == nullptr) {
    return "";
  }
  char word[64] = {};
  const bool read = std::fscanf(file, "%63s", word) == 1;
  std::fclose(file);
  return read ? word : "";
}

CacheSizes read_cache_sizes() {
  CacheSizes sizes;
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    const std::string level = read_word(dir + "level"), type = read_word(dir + "type");
    if (type.empty() || type == "Instruction") {
      continue;
    }
    const int64_t bytes = parse_cache_size(read_word(dir + "size"));
    if (level == "2" && bytes > 0) {
      sizes.l2 = bytes;
    } else if (level == "3" && bytes > 0) {
      sizes.l3 = bytes;
    }
  }
  return sizes;
}

const CacheSizes& cache_sizes() {
  static const CacheSizes sizes = read_cache_sizes();
  return sizes;
}

// Whether the L3 is a fast victim cache of the cores' L2s (AMD Zen) rather than one barely faster
// than memory for a streaming pass (Intel's server parts).
bool has_victim_l3() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd");
  }();
  return amd;
#else
  return false;
#endif
}

// Whether `bytes` fit in the caches near the threads: their L2s, or on a CPU with a victim L3 half
// of that L3 if more. Eval does not stream an output that fits there with its input: it would
// leave the cache for nothing (the next layer reads it). On 2 threads of Sapphire Rapids,
// 8x256x14x14 (1.6 MB) eval 0.047 -> 0.038 ms; on 1 thread, the input and output exceed one L2 and
// streaming still gains (channels_last eval 0.125 -> 0.097 ms, above). On 2 threads of an AMD
// EPYC (Zen 3, 32 MB of L3, 512 KB of L2 per core), ordinary stores took 0.58-0.88x the time of
// streaming ones for eval outputs of 3.2 to 4 MB (8x128x28x28, 4096x256, 8x2048x7x7), 0.57-0.79x
// for 6.4 MB (8x64x56x56 and 8x256x28x28 float32, 8x512x28x28 channels_last bfloat16; a quarter
// of the L3 streamed those), and 1.2-1.3x from 12.8 MB on (8x512x28x28 channels_last, 32x128x1000).
// The training forward has a rule of its own (train_streams).
bool fits_in_near_caches(int64_t bytes) {
  const CacheSizes& sizes = cache_sizes();
  int64_t near = sizes.l2 * at::get_num_threads();
  if (has_victim_l3()) {
    near = std::max(near, sizes.l3 / 2);
  }
  return bytes <= near;
}

// Whether eval streams `output`, written as `layout` says (streams), when its input and it do not
// fit in the caches near the threads together; a float32 output on one thread, when they do not
// fit in its L2. A victim L3's half was measured on 2 threads only (above). On 1 thread of an AMD
// EPYC Zen 4 guest (1 MB of L2), in-process, streamed time / ordinary for outputs of 3.2 to 6.4 MB:
// float32 eval 0.54-0.80 (8x1024x14x14, 8x256x28x28, 8x64x56x56 NCHW and channels_last,
// 8x128x28x28 NCHW, 8x2048x7x7 and 4096x256); followed by a relu of the output, 0.79-0.93 from 4 MB
// on, 1.10 for the 3.2 MB 8x128x28x28. bfloat16 was mixed: 8x512x28x28 0.89-0.90, but the 8.2 MB
// of 32x128x1000 1.29 (1.13 with the relu). On 2 threads float32 was mixed too (0.70-2.5).
bool eval_streams(const Tensor& output, const Layout& layout, bool in_memory_order = false) {
  const int64_t bytes = 2 * static_cast<int64_t>(output.nbytes());
  const bool near = output.scalar_type() == at::kFloat && at::get_num_threads() == 1 ? bytes <= cache_sizes().l2
                                                                                     : fits_in_near_caches(bytes);
  return streams(output, layout, in_memory_order) && !near;
}

// Whether the training forward streams `output`: as eval does on several threads with a victim
// L3, otherwise whenever it can (streams). Streaming there left the backward, timed right after in
// the benchmark, its input and output gradient in cache (8x256x14x14 channels_last forward and
// backward 0.35 ms with ordinary stores, 0.28 ms streamed, Sapphire Rapids). On 2 threads of an
// AMD EPYC Zen 4 guest, in-process, ordinary time / streamed for float32 outputs of 1.6 to 6.4 MB
// (8x1024x14x14, 8x2048x7x7, 8x64x56x56, 8x128x28x28 and 8x256x14x14 channels_last;
// 8x1024x14x14, 8x64x56x56 and 8x128x28x28 NCHW; 4096x256): training forward 0.55-0.85, followed
// by a relu of the output 0.49-0.62, forward and backward 0.82-1.08; bfloat16 training forward
// 0.66-0.93 (8x512x28x28 NCHW 1.08). From 12.8 MB on, streaming gained (8x512x28x28 1.10-1.42,
// 8x256x56x56 channels_last 1.24, 32x128x1000 1.19). On 1 thread float32 was mixed at 3.2 to 6.4
// MB (0.82-1.22), so one thread keeps streaming.
bool train_streams(const Tensor& output, const Layout& layout, bool in_memory_order = false) {
  if (has_victim_l3() && at::get_num_threads() > 1) {
    return eval_streams(output, layout, in_memory_order);
  }
  return streams(output, layout, in_memory_order);
}

// A rows pass's input values of kind Kind at `data`.
template <typename Kind, typename scalar_t>
C10_ALWAYS_INLINE typename KindValues<Kind>::type load_row(const scalar_t* data) {
  if constexpr (std::is_same_v<Kind, LaneOrderPair<scalar_t>>) {
    return load_interleaved(data);
  } else {
    return load_as<Kind>(data);
  }
}

// A rows pass's output values of kind Kind at `data` (store_output).
template <typename Kind, typename scalar_t, typename T>
C10_ALWAYS_INLINE void store_row(scalar_t* data, const T& values, bool stream) {
  if constexpr (std::is_same_v<Kind, LaneOrderPair<scalar_t>>) {
    store_interleaved(data, values[0], values[1], stream);
  } else {
    store_output(data, values, stream);
  }
}

// at::parallel_for whose chunks each end by ordering the thread's streaming stores (they are
// weakly ordered) before the region's end: one fence per chunk, as a fence per plane stalls.
template <typename F>
void parallel_for_output(int64_t begin, int64_t end, int64_t grain, bool stream, const F& body) {
  at::parallel_for(begin, end, grain, [&](int64_t chunk_begin, int64_t chunk_end) {
    body(chunk_begin, chunk_end);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    if (stream) {
      _mm_sfence();
    }
#endif
  });
}

// Most lanes of any compute-type vector (float with AVX-512).
constexpr int64_t kMaxLanes = 16;

// Entries [channels, channels + kMaxLanes) of `values` repeat the first channels cyclically, so
// that the channels of any kMaxLanes planes in a row load as one vector from the first one's
// (map_plane_blocks).
template <typename T>
void wrap_channels(std::vector<T>& values, int64_t channels) {
  for (int64_t j = channels; j < channels + kMaxLanes; ++j) {
    values[j] = values[j % channels];
  }
}

// Whether a channel's mean lies within one standard deviation of zero, |mean| <= sqrt(var + eps):
// where its passes fold it into the shift (folding_affine, folded_gradient).
inline bool folds_mean(double mean, double invstd) {
  return std::abs(mean) * invstd <= 1.0;
}

// normalize_affine's coefficients, folded where that costs no accuracy: with the mean within one
// standard deviation of zero, |mean| <= sqrt(var + eps), the center is 0 and the shift bias - mean *
// scale, and the passes compute x * scale + shift (affine_map), one vector operation fewer per
// vector. Rounding the folded shift adds about u(|bias| + |weight|) to an output, one unit in the
// last place of an output one standard deviation out; rounding the scale, u |x| |scale| <= u (|x -
// mean| + sqrt(var + eps)) |scale|, as much again. Farther from zero, the mean stays the center:
// folded, it would cancel against x. Against float64, the largest output errors of the tests'
// large shapes came out 0.63-1.06x those of the centered form (the subtraction rounds too). On 2
// threads of an AMD EPYC Zen 4 guest, in-process, time folded / centered: float32 eval 0.77-0.97
// (8x64x56x56 and 8x1024x14x14 channels_last 0.77-0.79), NCHW training forward of 8x512x28x28 0.75
// and 32x128x1000 0.95, other training forwards 0.97-1.00.
template <typename opmath_t>
Affine<opmath_t> folding_affine(double mean, double invstd, double weight, double bias) {
  if (folds_mean(mean, invstd)) {
    const double scale = weight * invstd;
    return {opmath_t(0), static_cast<opmath_t>(scale), static_cast<opmath_t>(bias - mean * scale)};
  }
  return normalize_affine<opmath_t>(mean, invstd, weight, bias);
}

// The input gradient's coefficients in the kernel's compute type, its (x - mean) term folded as
// folding_affine folds the forward: x * xmu_scale + (shift - mean * xmu_scale) where the mean lies
// within one standard deviation of zero. `center`: what the pass subtracts from x, 0 where folded.
// Largest input-gradient errors against float64 as before, the values a unit apart here and there.
// On 2 threads of an AMD EPYC Zen 4 guest, in-process, time folded / centered: float32 training
// backward 0.87-1.02 (channels_last 8x1024x14x14 0.87, 8x512x28x28 0.92), 1 thread 0.84-0.96,
// bfloat16 0.88-0.98.
template <typename opmath_t>
InputGradient<opmath_t> folded_gradient(InputGradient<double> g, opmath_t mean, double invstd, opmath_t& center) {
  center = mean;
  if (folds_mean(mean, invstd)) {
    g.shift -= static_cast<double>(mean) * g.xmu_scale;
    center = 0;
  }
  return {static_cast<opmath_t>(g.dy_scale), static_cast<opmath_t>(g.xmu_scale), static_cast<opmath_t>(g.shift)};
}

// Per-channel normalize coefficients, one array each so the channel loop vectorizes.
template <typename opmath_t>
struct ChannelAffines {
  std::vector<opmath_t> center, scale, shift;

  // Whether whole groups of channels are in lane order (for rows passes, for_each_row_channel),
  // once set and put so by put_in_lane_order.
  bool lane_order = false;

  // Each array has room for kMaxLanes values past the last channel (wrap).
  explicit ChannelAffines(int64_t channels, bool lane_order = false)
      : center(channels + kMaxLanes), scale(channels + kMaxLanes), shift(channels + kMaxLanes),
        lane_order(lane_order) {}

  // Channels [begin, end), once set, into lane order where the arrays are kept so.
  void put_in_lane_order(int64_t begin, int64_t end) {
    if (lane_order) {
      to_lane_order({&center, &scale, &shift}, begin, end);
    }
  }

  void wrap(int64_t channels) {
    for (auto* values : {&center, &scale, &shift}) {
      wrap_channels(*values, channels);
    }
  }

  // Whether any channel set has a center other than 0 (or NaN): passes skip the subtraction otherwise.
  bool centered = false;

  void set(int64_t c, const Affine<opmath_t>& affine) {
    centered = centered || !(affine.center == 0);
    center[c] = affine.center;
    scale[c] = affine.scale;
    shift[c] = affine.shift;
  }

  Affine<opmath_t> get(int64_t c) const { return {center[c], scale[c], shift[c]}; }
};

// A cache line, in values of scalar_t.
template <typename scalar_t>
constexpr int64_t kLineValues = 64 / sizeof(scalar_t);

// Whether an elementwise pass writes a run's last values that do not fill a vector as the run's
// last whole vector, overlapping values it already wrote (the same values again), rather than as a
// partial vector. Without AVX-512's masked loads and stores, a partial vector's load and store go
// through a buffer on the stack and stall on the load: on 2 threads of an AMD EPYC (Zen 3), the
// one value left of each 7x7 plane took a third of a bfloat16 training forward's normalize pass.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kOverlapTails = false;
#else
constexpr bool kOverlapTails = true;
#endif

// out[i..] = values(load) over n values, one vector (count values) at a time, where load(in)
// gives the vector of an input run `in` at the same positions: the lanes must all compute alike,
// as kInterleavedPairs may hand them over in another order. With `stream`,
// whole lines are written with streaming stores, and the values before the first line boundary
// and after the last one with ordinary stores, as a line partly streamed makes streaming slow.
// A partial vector ends the run (short planes, 7x7, are mostly tail), or with kOverlapTails the
// run's last whole vector outside the streamed lines where there is one. out must not alias what
// `values` reads.
template <typename scalar_t, typename Values>
C10_ALWAYS_INLINE void map_run(scalar_t* out, int64_t n, bool stream, const Values& values) {
  constexpr int64_t kSize = OpVec<scalar_t>::size();
  constexpr int64_t kStep = kStoresPairs<scalar_t> ? 2 * kSize : kSize;
  constexpr int64_t kLine = kLineValues<scalar_t>;
  static_assert(kLine % kStep == 0);
  // values at the `count` positions from i.
  const auto values_at = [&](int64_t i, int64_t count) C10_ALWAYS_INLINE_ATTRIBUTE {
    return values([&](const scalar_t* in) C10_ALWAYS_INLINE_ATTRIBUTE { return load_vec(in + i, count); });
  };
  // The kStep values at out + i.
  const auto store_step = [&](int64_t i, bool streamed) C10_ALWAYS_INLINE_ATTRIBUTE {
    if constexpr (kInterleavedPairs<scalar_t>) {
      const auto half = [&](int64_t k) C10_ALWAYS_INLINE_ATTRIBUTE {
        return values([&](const scalar_t* in) C10_ALWAYS_INLINE_ATTRIBUTE { return load_interleaved(in + i)[k]; });
      };
      store_interleaved(out + i, half(0), half(1), streamed);
    } else if constexpr (kStoresPairs<scalar_t>) {
      store_pair(out + i, values_at(i, kSize), values_at(i + kSize, kSize), streamed);
    } else if (streamed) {
      store_output(out + i, values_at(i, kSize), /*stream=*/true);
    } else {
      store_vec(out + i, values_at(i, kSize));
    }
  };
  // The values [i, end), fewer than a vector, of a stretch written with ordinary stores from `begin`.
  const auto store_rest = [&](int64_t i, int64_t end, int64_t begin) C10_ALWAYS_INLINE_ATTRIBUTE {
    if (kOverlapTails && end - begin >= kSize) {
      store_vec(out + end - kSize, values_at(end - kSize, kSize));
    } else {
      store_vec(out + i, values_at(i, end - i), end - i);
    }
  };
  int64_t i = 0;
  int64_t ordinary_begin = 0;  // of the stretch after the streamed lines
  if (stream) {
    const int64_t misalignment = reinterpret_cast<uintptr_t>(out) / sizeof(scalar_t) % kLine;
    const int64_t head = misalignment == 0 ? 0 : std::min(n, kLine - misalignment);
    const int64_t streamed_end = head + (n - head) / kLine * kLine;
    for (; i + kSize <= head; i += kSize) {
      store_vec(out + i, values_at(i, kSize));
    }
    if (i < head) {
      store_rest(i, head, 0);
      i = head;
    }
    for (; i < streamed_end; i += kStep) {
      store_step(i, /*streamed=*/true);
    }
    ordinary_begin = streamed_end;
  }
  for (; i + kStep <= n; i += kStep) {
    store_step(i, /*streamed=*/false);
  }
  if (kStep > kSize && i + kSize <= n) {
    store_vec(out + i, values_at(i, kSize));
    i += kSize;
  }
  if (i < n) {
    store_rest(i, n, ordinary_begin);
  }
}

// y = (x - center) * scale + shift over n values.
template <typename opmath_t, typename scalar_t>
C10_ALWAYS_INLINE void normalize_run(const scalar_t* x, scalar_t* y, int64_t n, const Affine<opmath_t>& affine,
                                     bool stream) {
  using Vec = OpVec<scalar_t>;
  const Vec center(affine.center), scale(affine.scale), shift(affine.shift);
  with_centering(!(affine.center == 0), [&](auto centered) C10_ALWAYS_INLINE_ATTRIBUTE {
    map_run(y, n, stream, [&](const auto& load) C10_ALWAYS_INLINE_ATTRIBUTE {
      return affine_map<decltype(centered)::value>(load(x), center, scale, shift);
    });
  });
}

// Lanes of `table` in the order of `index` (lane k takes table's lane index[k]).
template <typename Vec, typename IndexVec>
C10_ALWAYS_INLINE Vec permute_lanes(const Vec& table, const IndexVec& index) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<Vec, at::vec::Vectorized<float>>) {
    return _mm512_permutexvar_ps(index, table);
  } else if constexpr (std::is_same_v<Vec, at::vec::Vectorized<double>>) {
    return _mm512_permutexvar_pd(index, table);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<Vec, at::vec::Vectorized<float>>) {
    return _mm256_permutevar8x32_ps(table, index);
  }
#endif
  using T = typename Vec::value_type;
  using I = typename IndexVec::value_type;
  T from[Vec::size()], to[Vec::size()];
  I lanes[IndexVec::size()];
  table.store(from);
  index.store(lanes);
  for (int64_t k = 0; k < Vec::size(); ++k) {
    to[k] = from[lanes[k]];
  }
  return Vec::loadu(to);
}

// out[i..] = values(load, picked) over a whole planar tensor in memory order, one vector (count
// values) at a time, for planes shorter than kMinStreamedPlane (planes_in_memory_order,
// planes_as_columns); load(in) gives the vector of an input tensor `in` at the same positions, in
// the lane order of picked (kInterleavedPairs may hand pairs over interleaved).
// picked[k] holds, in each lane, coefficient k of that lane's channel. The tensor is walked in
// blocks of as many planes as a vector has lanes: a block is `inner` whole vectors, and its
// planes' coefficients are one vector each, loaded from `cyclic[k]` at the first plane's channel
// (cyclic arrays repeat their first channels past the last, wrap_channels). Each vector
// picks its lanes' coefficients from those with a permute, by the plane each lane falls in: no
// branch per plane (planes of 4 values: (64, 256, 2, 2) eval 34 -> 10 us). Threads split the
// tensor between blocks, so with `stream` every vector but the tensor's last partial one
// is written whole by streaming stores, whatever the planes' length.
//
// `values` is copied into each task, and should capture by value: what a loop reads through a
// reference it reloads after every store, which may alias it.
template <int64_t K, typename scalar_t, typename opmath_t, typename Values>
void map_plane_blocks(scalar_t* out, const Layout& layout, bool stream, std::array<const opmath_t*, K> cyclic,
                      const Values& values) {
  using Vec = OpVec<scalar_t>;
  constexpr int64_t kSize = Vec::size();
  static_assert(kSize <= kMaxLanes);
  TORCH_INTERNAL_ASSERT(layout.inner < kMinStreamedPlane);  // lane positions stay exact in float
  const int64_t inner = layout.inner;
  const int64_t channels = layout.channels;
  const int64_t planes = layout.batch * channels;
  const int64_t num_blocks = (planes + kSize - 1) / kSize;
  // Lane k of a block's vector v holds value v * kSize + k of the block, in plane
  // floor((v * kSize + k + 0.5) / inner): the half keeps the product off whole numbers, and
  // these values (below 4096) are exact in float.
  const Vec first_positions = Vec::arange(opmath_t(0.5), opmath_t(1));
  const Vec inverse_inner(static_cast<opmath_t>(1.0 / static_cast<double>(inner)));
  const Vec step(static_cast<opmath_t>(kSize));
  // Positions of an interleaved pair's lanes past those of a vector in order (kInterleavedPairs):
  // the first vector's low half 0, its high half kSize / 2; the second vector's kSize / 2 and kSize.
  const std::array<Vec, 2> pair_offsets{Vec::set(Vec(opmath_t(kSize / 2)), Vec(opmath_t(0)), kSize / 2),
                                        Vec::set(Vec(opmath_t(kSize)), Vec(opmath_t(kSize / 2)), kSize / 2)};
  const int64_t grain = std::max<int64_t>(1, kGrainValues / (kSize * inner));
  parallel_for_output(0, num_blocks, grain, stream, [&](int64_t block_begin, int64_t block_end) {
    // Locals: the loop would reload what it reads through the task's captures after every store.
    const auto task_values = values;
    scalar_t* const task_out = out;
    const bool task_stream = stream;
    const Vec task_first_positions = first_positions;
    const Vec task_inverse_inner = inverse_inner;
    const Vec task_step = step;
    const std::array<Vec, 2> task_pair_offsets = pair_offsets;
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t first_plane = block * kSize;
      std::array<Vec, K> block_values;
      for (int64_t k = 0; k < K; ++k) {
        block_values[k] = Vec::loadu(cyclic[k] + first_plane % channels);
      }
      const int64_t begin = first_plane * inner;
      const int64_t end = std::min(planes, first_plane + kSize) * inner;
      Vec positions = task_first_positions;
      // The values of lanes at `lane_positions` (of a value's middle, from the block's start).
      const auto values_at = [&](const Vec& lane_positions, const auto& load) C10_ALWAYS_INLINE_ATTRIBUTE {
        const auto lane_planes = at::vec::convert_to_int_of_same_size((lane_positions * task_inverse_inner).floor());
        std::array<Vec, K> picked;
        for (int64_t k = 0; k < K; ++k) {
          picked[k] = permute_lanes(block_values[k], lane_planes);
        }
        return task_values(load, picked);
      };
      // The values of the count values at i, the block's next ones.
      const auto next_values = [&](int64_t i, int64_t count) C10_ALWAYS_INLINE_ATTRIBUTE {
        const Vec lane_positions = positions;
        positions = positions + task_step;
        return values_at(lane_positions,
                         [&](const scalar_t* in) C10_ALWAYS_INLINE_ATTRIBUTE { return load_vec(in + i, count); });
      };
      int64_t i = begin;
      if constexpr (kStoresPairs<scalar_t>) {
        if (i % (2 * kSize) != 0 && i + kSize <= end) {  // pairs start at a multiple of 2 vectors
          store_output(task_out + i, next_values(i, kSize), task_stream);
          i += kSize;
        }
        for (; i + 2 * kSize <= end; i += 2 * kSize) {
          if constexpr (kInterleavedPairs<scalar_t>) {
            // Lanes 4-7 of the first vector hold values 8-11, the second's 0-3 values 4-7.
            const auto half = [&](int64_t k) C10_ALWAYS_INLINE_ATTRIBUTE {
              return values_at(positions + task_pair_offsets[k], [&](const scalar_t* in) C10_ALWAYS_INLINE_ATTRIBUTE {
                return load_interleaved(in + i)[k];
              });
            };
            store_interleaved(task_out + i, half(0), half(1), task_stream);
            positions = positions + task_step + task_step;
          } else {
            const Vec first = next_values(i, kSize);
            store_pair(task_out + i, first, next_values(i + kSize, kSize), task_stream);
          }
        }
      }
      for (; i < end; i += kSize) {
        if (i + kSize <= end) {
          store_output(task_out + i, next_values(i, kSize), task_stream);
        } else {
          store_vec(task_out + i, next_values(i, end - i), end - i);
        }
      }
    }
  });
}

// y = (x - center) * scale + shift over a planar tensor in memory order (map_plane_blocks);
// `affines` wrapped.
template <typename opmath_t, typename scalar_t>
void normalize_planes_in_order(const scalar_t* x, scalar_t* y, const Layout& layout,
                               const ChannelAffines<opmath_t>& affines, bool stream) {
  using Vec = OpVec<scalar_t>;
  with_centering(affines.centered, [&](auto centered) {
    map_plane_blocks<3>(y, layout, stream,
                        std::array<const opmath_t*, 3>{affines.center.data(), affines.scale.data(),
                                                       affines.shift.data()},
                        [=](const auto& load, const std::array<Vec, 3>& k) C10_ALWAYS_INLINE_ATTRIBUTE {
                          return affine_map<decltype(centered)::value>(load(x), k[0], k[1], k[2]);
                        });
  });
}

// Vectors of a row whose coefficients normalize_short_rows keeps in registers: three registers
// per vector, of the 32 AVX-512 has or the 16 of AVX2.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kMaxRegisterRowVecs = 8;
#else
constexpr int64_t kMaxRegisterRowVecs = 4;
#endif

// normalize_rows over whole rows of kUnits units (vectors, or pairs of them where a reduced type
// stores pairs), each unit's coefficients loaded once for the block rather than once per row. On
// an AMD EPYC Zen 4 guest, two builds alternating, old time / new: channels_last eval 1.18-1.34
// (float32 8x64x56x56, 8x128x28x28, 4x64x28x28; 1 and 2 threads), bfloat16 1.19-1.39, (4096, 128)
// 1.24; training forwards whose output streams, bound by their stores, 1.00-1.04.
template <int64_t kUnits, bool kCentered, typename Unit, typename opmath_t, typename scalar_t>
void normalize_short_rows(const scalar_t* x, scalar_t* y, const RowBlock& rows, const ChannelAffines<opmath_t>& affines,
                          bool stream) {
  constexpr int64_t kUnitValues = Unit::size();
  constexpr int64_t kWidth = kUnits * kUnitValues;
  Unit center[kUnits], scale[kUnits], shift[kUnits];
  for (int64_t k = 0; k < kUnits; ++k) {
    center[k] = load_as<Unit>(affines.center.data() + k * kUnitValues);
    scale[k] = load_as<Unit>(affines.scale.data() + k * kUnitValues);
    shift[k] = load_as<Unit>(affines.shift.data() + k * kUnitValues);
  }
  for (int64_t r = rows.row_begin; r < rows.row_end; ++r) {
    for (int64_t k = 0; k < kUnits; ++k) {
      const int64_t i = r * kWidth + k * kUnitValues;
      store_row<Unit>(y + i, affine_map<kCentered>(load_row<Unit>(x + i), center[k], scale[k], shift[k]), stream);
    }
  }
}

// Whether normalize_rows handed its rows to normalize_short_rows: whole rows of whole units, at
// most kMaxRegisterRowVecs vectors, coefficients in channel order. Wider rows walked as blocks of
// that many vectors lost where rows are 4 KB apart (8x1024x14x14 eval 1.10x the time on 1 thread).
template <typename opmath_t, typename scalar_t>
bool normalized_as_short_rows(const scalar_t* x, scalar_t* y, int64_t channels, const RowBlock& rows,
                              const ChannelAffines<opmath_t>& affines, bool stream) {
  using Unit = std::conditional_t<kStoresPairs<scalar_t>, VecPair<scalar_t>, OpVec<scalar_t>>;
  constexpr int64_t kUnitValues = Unit::size();
  constexpr int64_t kUnitVecs = kUnitValues / OpVec<scalar_t>::size();
  if (affines.lane_order || rows.channel_begin != 0 || rows.channel_end != channels || channels % kUnitValues != 0 ||
      channels / kUnitValues * kUnitVecs > kMaxRegisterRowVecs) {
    return false;
  }
  const int64_t units = channels / kUnitValues;
  bool done = false;
  with_centering(affines.centered, [&](auto centered) {
    constexpr bool kCentered = decltype(centered)::value;
    const auto run = [&]<int64_t... kIndex>(std::integer_sequence<int64_t, kIndex...>) {
      return ((units == kIndex + 1 &&
               (normalize_short_rows<kIndex + 1, kCentered, Unit>(x, y, rows, affines, stream), true)) ||
              ...);
    };
    done = run(std::make_integer_sequence<int64_t, kMaxRegisterRowVecs / kUnitVecs>{});
  });
  return done;
}

// The same over a block of a rows tensor of `channels` channels, with each channel's coefficients.
template <typename opmath_t, typename scalar_t>
void normalize_rows(const scalar_t* x, scalar_t* y, int64_t channels, const RowBlock& rows,
                    const ChannelAffines<opmath_t>& affines, bool stream) {
  if (normalized_as_short_rows(x, y, channels, rows, affines, stream)) {
    return;
  }
  const opmath_t* center = affines.center.data();
  const opmath_t* scale = affines.scale.data();
  const opmath_t* shift = affines.shift.data();
  with_centering(affines.centered, [&](auto centered) {
    for_each_row_channel<scalar_t>(rows, affines.lane_order, [&](int64_t r, int64_t c, auto kind) {
      using Kind = decltype(kind);
      using T = typename KindValues<Kind>::type;
      const int64_t i = r * channels + c;
      const T values = affine_map<decltype(centered)::value>(load_row<Kind>(x + i), load_as<T>(center + c),
                                                              load_as<T>(scale + c), load_as<T>(shift + c));
      store_row<Kind>(y + i, values, stream);
    });
  });
}

// dx = dy * dy_scale + (x - mean) * xmu_scale + shift over n values.
template <typename opmath_t, typename scalar_t>
C10_ALWAYS_INLINE void input_grad_run(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t n, opmath_t mean,
                                      const InputGradient<opmath_t>& g, bool stream) {
  using Vec = OpVec<scalar_t>;
  const Vec mean_vec(mean), dy_scale(g.dy_scale), xmu_scale(g.xmu_scale), shift(g.shift);
  with_centering(!(mean == 0), [&](auto centered) C10_ALWAYS_INLINE_ATTRIBUTE {
    map_run(dx, n, stream, [&](const auto& load) C10_ALWAYS_INLINE_ATTRIBUTE {
      const Vec xmu_term = affine_map<decltype(centered)::value>(load(x), mean_vec, xmu_scale, shift);
      return multiply_add(load(dy), dy_scale, xmu_term);
    });
  });
}

// Per-channel coefficients of a rows tensor's input gradient, one array each, in lane order if
// `lane_order` (for_each_row_channel).
template <typename opmath_t>
struct RowGradients {
  const opmath_t* mean;
  const opmath_t* dy_scale;
  const opmath_t* xmu_scale;
  const opmath_t* shift;
  bool lane_order = false;
  // Whether any mean of the channels passed is other than 0 (folded_gradient).
  bool centered = true;
};

// input_grad_run over a block of a rows tensor, with each channel's coefficients. Everything
// arrives by value: inside a parallel region, values captured by reference were reloaded at every
// vector (a store may alias them), 25% of the backward of (8, 8192).
template <typename opmath_t, typename scalar_t>
void input_grad_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t channels, RowBlock rows,
                     RowGradients<opmath_t> g, bool stream) {
  with_centering(g.centered, [&](auto centered) {
    for_each_row_channel<scalar_t>(rows, g.lane_order, [&](int64_t r, int64_t c, auto kind) {
      using Kind = decltype(kind);
      using T = typename KindValues<Kind>::type;
      const int64_t i = r * channels + c;
      const T xmu_term = affine_map<decltype(centered)::value>(load_row<Kind>(x + i), load_as<T>(g.mean + c),
                                                                load_as<T>(g.xmu_scale + c), load_as<T>(g.shift + c));
      store_row<Kind>(dx + i, multiply_add(load_row<Kind>(dy + i), load_as<T>(g.dy_scale + c), xmu_term), stream);
    });
  });
}

// The `batch` planes of channel c, normalized with one set of coefficients.
template <typename opmath_t, typename scalar_t>
void normalize_channel(const scalar_t* x, scalar_t* y, const Layout& layout, int64_t c, const Affine<opmath_t>& affine,
                       bool stream, int64_t n0 = 0, int64_t n1 = -1) {
  for (int64_t n = n0; n < (n1 < 0 ? layout.batch : n1); ++n) {
    const int64_t offset = (n * layout.channels + c) * layout.inner;
    normalize_run(x + offset, y + offset, layout.inner, affine, stream);
  }
}

// The input gradient of channel c's planes in images [n0, n1): dx = dy * dy_scale in eval.
template <typename opmath_t, typename scalar_t>
void channel_input_grad(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Layout& layout, int64_t c,
                        int64_t n0, int64_t n1, opmath_t mean, const InputGradient<opmath_t>& g, bool training,
                        bool stream) {
  if (!training) {
    normalize_channel(dy, dx, layout, c, Affine<opmath_t>{0, g.dy_scale, 0}, stream, n0, n1);
    return;
  }
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t offset = (n * layout.channels + c) * layout.inner;
    input_grad_run(dy + offset, x + offset, dx + offset, layout.inner, mean, g, stream);
  }
}

// Coefficients that only scale, by scale[c] (eval's input gradient, dx = dy * dy_scale), in lane
// order if `scale` is.
template <typename opmath_t>
ChannelAffines<opmath_t> scale_affines(const opmath_t* scale, int64_t channels, bool lane_order = false) {
  ChannelAffines<opmath_t> affines(channels, lane_order);
  for (int64_t c = 0; c < channels; ++c) {
    affines.set(c, Affine<opmath_t>{0, scale[c], 0});
  }
  return affines;
}

// Parallel over planes in memory order, each normalized with its channel's coefficients (eval,
// which needs no per-channel sums). Split by channels instead, a layer of few channels left a
// thread idle: on 2 threads, (64, 3, 32, 32) 0.034 -> 0.020 ms and (16, 3, 224, 224) 0.48 -> 0.38
// ms in memory order, (256, 16, 16, 16) 0.16 -> 0.14 ms; ResNet-50's layers at par.
template <typename opmath_t, typename scalar_t>
void normalize_planar(const scalar_t* x, scalar_t* y, const Layout& layout, const ChannelAffines<opmath_t>& affines,
                      bool stream) {
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, layout.inner));
  parallel_for_output(0, layout.batch * layout.channels, grain, stream, [&](int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int64_t offset = p * layout.inner;
      normalize_run(x + offset, y + offset, layout.inner, affines.get(p % layout.channels), stream);
    }
  });
}

// Values per block of rows_last_first.
constexpr int64_t kRowBlockValues = 16384;

// body(block_begin, block_end) over rows [begin, end) of `channels` values each, in blocks of about
// kRowBlockValues values, the last block first. An elementwise pass after a reduction over the
// same rows (split alike between threads) walks them so: it starts on the rows the reduction read
// last, still in the core's cache, rather than on those long evicted. Training forward on 2
// threads: 8x64x56x56 channels_last 0.385 -> 0.335 ms, 8x1024x14x14 channels_last 0.49 -> 0.44
// ms, (4096, 256) 0.282 -> 0.263 ms.
template <typename Body>
void rows_last_first(int64_t begin, int64_t end, int64_t channels, const Body& body) {
  const int64_t block = std::max<int64_t>(1, kRowBlockValues / std::max<int64_t>(1, channels));
  for (int64_t block_end = end; block_end > begin; block_end -= block) {
    body(std::max(begin, block_end - block), block_end);
  }
}

// Parallel over rows, each normalized with its channels' coefficients; `after_reduction`: the
// statistics were just reduced over these rows (rows_last_first).
template <typename opmath_t, typename scalar_t>
void normalize_all_rows(const scalar_t* x, scalar_t* y, const Layout& layout, const ChannelAffines<opmath_t>& affines,
                        bool stream, bool after_reduction) {
  const int64_t channels = layout.channels;
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, channels));
  parallel_for_output(0, layout.num_rows, grain, stream, [&](int64_t begin, int64_t end) {
    if (!after_reduction) {
      normalize_rows(x, y, channels, RowBlock{begin, end, 0, channels}, affines, stream);
      return;
    }
    rows_last_first(begin, end, channels, [&](int64_t block_begin, int64_t block_end) {
      normalize_rows(x, y, channels, RowBlock{block_begin, block_end, 0, channels}, affines, stream);
    });
  });
}

// Fixed partition of a rows tensor into tasks: parts of rows times blocks of channels, so that
// a few rows of many channels still make several tasks. A single part (fewer than 2 *
// kMinPartRows rows, or fewer than 2 * kMinPartValues values) has blocks of about kMinPartValues
// values (a multiple of kParamBlock channels, at most kChannelBlock): (64, 1024) makes 4 tasks
// rather than 1.
struct RowPartition {
  int64_t num_rows;
  int64_t channels;
  int64_t num_parts;
  int64_t channel_block;
  int64_t num_channel_blocks;

  explicit RowPartition(const Layout& layout)
      : num_rows(layout.num_rows),
        channels(layout.channels),
        num_parts(std::clamp<int64_t>(
            std::min(layout.num_rows * layout.channels / kMinPartValues, layout.num_rows / kMinPartRows), 1,
            kMaxParts)),
        channel_block(num_parts > 1 ? kChannelBlock : one_part_block(layout.num_rows)),
        num_channel_blocks((layout.channels + channel_block - 1) / channel_block) {}

  int64_t num_tasks() const { return num_parts * num_channel_blocks; }
  int64_t part(int64_t task) const { return task / num_channel_blocks; }
  int64_t row_begin(int64_t part) const { return part * num_rows / num_parts; }
  int64_t channel_begin(int64_t task) const { return task % num_channel_blocks * channel_block; }
  int64_t channel_end(int64_t task) const { return std::min(channels, channel_begin(task) + channel_block); }

 private:
  static int64_t one_part_block(int64_t num_rows) {
    const int64_t wanted = kMinPartValues / std::max<int64_t>(1, num_rows);
    return std::clamp<int64_t>((wanted + kParamBlock - 1) / kParamBlock * kParamBlock, kParamBlock, kChannelBlock);
  }
};

// An array of `count` values left uninitialized (std::vector zeroes its values, on one thread).
template <typename T>
std::unique_ptr<T[]> uninitialized_array(int64_t count) {
  return std::unique_ptr<T[]>(new T[count]);
}

// Prefetches `count` values from `data` into L1. A lambda that calls it must be always_inline: GCC
// (12) finds a function made only of prefetches free of side effects and drops the calls to it, so
// the backward's sums long ran without the prefetches their code asked for.
template <typename scalar_t>
C10_ALWAYS_INLINE void prefetch_values(const scalar_t* data, int64_t count) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  const char* bytes = reinterpret_cast<const char*>(data);
  for (int64_t offset = 0; offset < count * static_cast<int64_t>(sizeof(scalar_t)); offset += 64) {
    _mm_prefetch(bytes + offset, _MM_HINT_T0);
  }
#endif
}

// The prefetch argument of add_rows and add_rows_in_order that prefetches nothing.
constexpr auto kNoPrefetch = [](int64_t, int64_t, int64_t) {};

// Vectors of channels whose sums a rows reduction keeps in registers while it walks the rows.
constexpr int64_t kRowChunkVecs = 4;

// totals[j] += lanes[j] for `count` values: compute-type lanes flushed into the accumulation type.
template <typename opmath_t, typename acc_t>
C10_ALWAYS_INLINE void add_lanes(int64_t count, const opmath_t* __restrict lanes, acc_t* __restrict totals) {
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    totals[j] += lanes[j];
  }
}

// The sums of add_rows for channels [j_begin, width), fewer than a vector, over rows [r0, r1): one
// channel at a time.
template <typename scalar_t, typename acc_t, typename Terms>
C10_ALWAYS_INLINE void add_channels_one_by_one(int64_t r0, int64_t r1, int64_t j_begin, int64_t width, acc_t* first,
                                               acc_t* second, const Terms& terms) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t j = j_begin; j < width; ++j) {
    opmath_t first_tail = 0;
    opmath_t second_tail = 0;
    for (int64_t r = r0; r < r1; ++r) {
      terms(r, j, first_tail, second_tail);
    }
    first[j] += first_tail;
    second[j] += second_tail;
  }
}

// Per-channel pair sums over rows [row_begin, row_end) of a block of `width` channels of a rows
// tensor, added to first[j], second[j] (accumulation type). terms(r, j, first, second) adds row r's
// terms of channel j to compute-type accumulators, or of channels j.. when they are vectors. Chunks
// of channels are summed in registers over kRowFlushEvery rows, then flushed. prefetch(r, j,
// count) prefetches row r's values of channels j..j+count, kPrefetchRowsAhead rows ahead: a chunk
// walks its rows at a stride of the row length, which the hardware prefetcher does not follow
// (channels_last training forward 8-17% faster on 1 thread, up to 17% for bfloat16 on 2).
template <typename scalar_t, typename acc_t, typename Terms, typename Prefetch>
void add_rows(int64_t row_begin, int64_t row_end, int64_t width, acc_t* first, acc_t* second, const Terms& terms,
              const Prefetch& prefetch) {
  using Vec = OpVec<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  const auto flush = [](const Vec& lanes, acc_t* totals) {
    opmath_t values[Vec::size()];
    lanes.store(values);
    add_lanes(Vec::size(), values, totals);
  };
  const auto add_chunk = [&]<int64_t kVecs>(std::integral_constant<int64_t, kVecs>, int64_t r0, int64_t r1, int64_t j) {
    Vec first_lanes[kVecs];
    Vec second_lanes[kVecs];
    for (int64_t k = 0; k < kVecs; ++k) {
      first_lanes[k] = second_lanes[k] = Vec(opmath_t(0));
    }
    for (int64_t r = r0; r < r1; ++r) {
      if (r + kPrefetchRowsAhead < row_end) {
        prefetch(r + kPrefetchRowsAhead, j, kVecs * Vec::size());
      }
      for (int64_t k = 0; k < kVecs; ++k) {
        terms(r, j + k * Vec::size(), first_lanes[k], second_lanes[k]);
      }
    }
    for (int64_t k = 0; k < kVecs; ++k) {
      flush(first_lanes[k], first + j + k * Vec::size());
      flush(second_lanes[k], second + j + k * Vec::size());
    }
  };
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowFlushEvery) {
    const int64_t r1 = std::min(row_end, r0 + kRowFlushEvery);
    int64_t j = 0;
    for (; j + kRowChunkVecs * Vec::size() <= width; j += kRowChunkVecs * Vec::size()) {
      add_chunk(std::integral_constant<int64_t, kRowChunkVecs>{}, r0, r1, j);
    }
    for (; j + Vec::size() <= width; j += Vec::size()) {
      add_chunk(std::integral_constant<int64_t, 1>{}, r0, r1, j);
    }
    add_channels_one_by_one<scalar_t>(r0, r1, j, width, first, second, terms);
  }
}

// add_rows with `prefetch` where prefetch_ahead, without prefetches otherwise: chosen around the
// loops, as a branch inside them cost most of the prefetches' gain (float32 channels_last gradient
// sums of 8x256x56x56 on a Zen 3 kept 1.05-1.08x of 1.47-1.61x).
template <typename scalar_t, typename acc_t, typename Terms, typename Prefetch>
void add_rows_prefetching_if(bool prefetch_ahead, int64_t row_begin, int64_t row_end, int64_t width, acc_t* first,
                             acc_t* second, const Terms& terms, const Prefetch& prefetch) {
  if (prefetch_ahead) {
    add_rows<scalar_t>(row_begin, row_end, width, first, second, terms, prefetch);
  } else {
    add_rows<scalar_t>(row_begin, row_end, width, first, second, terms, kNoPrefetch);
  }
}

// Per-channel pair sums as add_rows gives them (the same terms added in the same order, so the
// same sums bit for bit), with the rows walked in memory order: each run of kRowFlushEvery rows
// is read row by row, its terms added to compute-type lanes of each channel kept in arrays (L1),
// which are then flushed. Width at most kChannelBlock. prefetch(r, j, count) as for add_rows,
// called for each vector with the row kPrefetchRowsAhead ahead: in memory order too, the hardware
// prefetcher alone left the sums at about twice the time of a plain read of both inputs (float32
// channels_last 8x256x56x56 below autograd on 1 thread of an AMD EPYC: 5.0 -> 3.0 ms in a
// standalone loop, where summing both inputs took 2.5 ms; prefetching a whole row at once gained
// less, 3.9 ms).
template <typename scalar_t, typename acc_t, typename Terms, typename Prefetch>
void add_rows_in_order(int64_t row_begin, int64_t row_end, int64_t width, acc_t* first, acc_t* second,
                       const Terms& terms, const Prefetch& prefetch) {
  using Vec = OpVec<scalar_t>;
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t vec_width = width / Vec::size() * Vec::size();
  alignas(64) opmath_t first_lanes[kChannelBlock];
  alignas(64) opmath_t second_lanes[kChannelBlock];
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowFlushEvery) {
    const int64_t r1 = std::min(row_end, r0 + kRowFlushEvery);
    std::fill_n(first_lanes, vec_width, opmath_t(0));
    std::fill_n(second_lanes, vec_width, opmath_t(0));
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t ahead = std::min(r + kPrefetchRowsAhead, row_end - 1);
      for (int64_t j = 0; j < vec_width; j += Vec::size()) {
        prefetch(ahead, j, Vec::size());
        Vec first_vec = Vec::loadu(first_lanes + j);
        Vec second_vec = Vec::loadu(second_lanes + j);
        terms(r, j, first_vec, second_vec);
        first_vec.store(first_lanes + j);
        second_vec.store(second_lanes + j);
      }
    }
    add_lanes(vec_width, first_lanes, first);
    add_lanes(vec_width, second_lanes, second);
    add_channels_one_by_one<scalar_t>(r0, r1, vec_width, width, first, second, terms);
  }
}

// Whether a rows pass reads two tensors of this layout's size (the backward's input and output
// gradient; the training forward's input, twice, and its output) from beyond the caches near the
// threads. Only then do its reductions prefetch the rows ahead: from those caches, the prefetches
// cost more than they hide. AMD EPYC (Zen 3), float32 channels_last statistics, prefetching rather
// than not: 8x256x56x56 1.44x faster on 1 thread, 1.53x on 2, 8x512x28x28 1.34x on 1; but
// 8x1024x14x14 and 8x2048x7x7 0.79-0.85x on either. bfloat16 8x256x56x56: 1.61x on 1 thread.
template <typename scalar_t>
bool rows_read_from_far(const Layout& layout) {
  return !fits_in_near_caches(2 * layout.num_rows * layout.channels * static_cast<int64_t>(sizeof(scalar_t)));
}

// Whether the rows reductions prefetch: rows read from far (rows_read_from_far) and wider than one
// chunk of add_rows, whose chunks then walk the rows at a stride. A row of one chunk is read in
// memory order, which the hardware prefetcher follows: on an AMD EPYC (Zen 4, AVX-512, one chunk
// is 64 float channels), float32 channels_last 8x64x112x112 without the prefetches took the
// training forward 2.30 -> 2.08 ms on 2 threads (4.61 -> 3.68 ms on 1), the backward's sums 1.86 ->
// 1.52 ms (2.06 -> 1.63 ms); bfloat16 sums 1.40 -> 1.04 ms on 1 thread.
template <typename scalar_t>
bool rows_wider_than_chunk(const Layout& layout) {
  return layout.channels > kRowChunkVecs * OpVec<scalar_t>::size();
}

template <typename scalar_t>
bool rows_prefetched(const Layout& layout) {
  return rows_wider_than_chunk<scalar_t>(layout) && rows_read_from_far<scalar_t>(layout);
}

// shift_of's value (through shift_from) for channels [c0, c0 + width) of a rows tensor (width at
// most kChannelBlock), from its first rows, into shifts; the loops run along the channels, so that
// they vectorize. Each task of a reduction computes its own: a few rows of its channels.
template <typename opmath_t, typename acc_t, typename scalar_t>
void rows_shifts(const scalar_t* x, const Layout& layout, int64_t c0, int64_t width, opmath_t* shifts) {
  const int64_t channels = layout.channels;
  const int64_t count = std::min(layout.num_rows, kShiftValues);
  const scalar_t* first = x + c0;
  acc_t offsets[kChannelBlock];
  std::fill(offsets, offsets + width, acc_t(0));
  for (int64_t r = 1; r < count; ++r) {
    for (int64_t j = 0; j < width; ++j) {
      offsets[j] += static_cast<acc_t>(first[r * channels + j]) - static_cast<acc_t>(first[j]);
    }
  }
  for (int64_t j = 0; j < width; ++j) {
    shifts[j] = shift_from<opmath_t>(static_cast<acc_t>(first[j]), offsets[j], count);
  }
}

// Sums of d = x - shift[j] and of d^2 over rows [r0, r1) of channels [c0, c0 + width) of a rows
// tensor of `channels` channels, into sum[j] and sum_sq[j]: the rare second pass of rows_moments.
// Its first pass writes the same loop in line: through a function (or a functor for the terms),
// it ran 25% slower on (64, 8192).
template <typename scalar_t, typename opmath_t, typename acc_t>
[[gnu::noinline]] void shifted_row_sums_again(const scalar_t* x, int64_t channels, int64_t r0, int64_t r1,
                                              int64_t c0, int64_t width, const opmath_t* shift, acc_t* sum,
                                              acc_t* sum_sq) {
  std::fill_n(sum, width, acc_t(0));
  std::fill_n(sum_sq, width, acc_t(0));
  const scalar_t* block = x + c0;
  add_rows<scalar_t>(
      r0, r1, width, sum, sum_sq,
      [&](int64_t r, int64_t j, auto& s1, auto& s2) {
        using T = std::decay_t<decltype(s1)>;
        const T d = load_as<T>(block + r * channels + j) - load_as<T>(shift + j);
        s1 = s1 + d;
        s2 = multiply_add(d, d, s2);
      },
      [&](int64_t r, int64_t j, int64_t count) __attribute__((always_inline)) {
        prefetch_values(block + r * channels + j, count);
      });
}

// Moments of every channel of a rows tensor: each task sums shifted by a value near the channel's
// mean (rows_shifts), then finish(c0, n, moments) runs for each block of n channels from c0 (at
// most kParamBlock) with their moments. Every part shifts a channel by the same value (from the
// tensor's first rows), so the parts' sums are simply added, in order: no per-part moments and no
// merge with a division per part and channel (training forward on 2 threads: 8x256x14x14
// channels_last 94 -> 81 us, (4096, 256) 241 -> 212 us). With a single part (RowPartition) each task
// finishes its own channels ((2, 65536) training forward 470 -> 309 us). `stream`: finish writes
// with streaming stores (each task fences them).
template <typename opmath_t, typename acc_t, typename scalar_t, typename Finish>
void rows_moments(const scalar_t* x, const Layout& layout, bool stream, const Finish& finish) {
  const int64_t channels = layout.channels;
  const RowPartition partition(layout);
  const bool one_part = partition.num_parts == 1;
  const acc_t row_count = static_cast<acc_t>(layout.num_rows);
  const bool prefetch_ahead = rows_prefetched<scalar_t>(layout);
  // Several parts: every channel's shift, computed once rather than by each part (that took 15%
  // of 8x256x14x14 channels_last statistics on 2 threads); per part, the sums of its channels,
  // then the sums of their squares (each task zeroes its own, in parallel and into its cache).
  std::vector<opmath_t> shifts(one_part ? 0 : channels);
  const auto part_sums = uninitialized_array<acc_t>(one_part ? 0 : 2 * partition.num_parts * channels);
  if (!one_part) {
    for_channel_blocks(channels, [&](int64_t c0, int64_t n) {
      rows_shifts<opmath_t, acc_t>(x, layout, c0, n, shifts.data() + c0);
    });
  }
  const auto run_tasks = [&] {
    parallel_for_output(0, partition.num_tasks(), 1, stream, [&](int64_t task_begin, int64_t task_end) {
      acc_t own_sum[kChannelBlock];
      acc_t own_sum_sq[kChannelBlock];
      opmath_t own_shift[kChannelBlock];
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t part = partition.part(task);
        const int64_t r0 = partition.row_begin(part);
        const int64_t r1 = partition.row_begin(part + 1);
        const int64_t c0 = partition.channel_begin(task);
        const int64_t width = partition.channel_end(task) - c0;
        opmath_t* shift = own_shift;
        acc_t* sum = own_sum;
        acc_t* sum_sq = own_sum_sq;
        if (one_part) {
          rows_shifts<opmath_t, acc_t>(x, layout, c0, width, own_shift);
        } else {
          shift = shifts.data() + c0;
          sum = part_sums.get() + 2 * part * channels + c0;
          sum_sq = sum + channels;
        }
        std::fill_n(sum, width, acc_t(0));
        std::fill_n(sum_sq, width, acc_t(0));
        const scalar_t* block = x + c0;
        const auto terms = [&](int64_t r, int64_t j, auto& s1, auto& s2) {
          using T = std::decay_t<decltype(s1)>;
          const T d = load_as<T>(block + r * channels + j) - load_as<T>(shift + j);
          s1 = s1 + d;
          s2 = multiply_add(d, d, s2);
        };
        add_rows_prefetching_if<scalar_t>(prefetch_ahead, r0, r1, width, sum, sum_sq, terms,
                                          [&](int64_t r, int64_t j, int64_t count) __attribute__((always_inline)) {
                                            prefetch_values(block + r * channels + j, count);
                                          });
        if (!one_part) {
          continue;
        }
        // Channels whose shift lay too far from their mean are summed again around it, the
        // block's rows still in cache (the other channels' sums come out the same).
        if (any_shift_too_far(row_count, width, sum, sum_sq)) {
          recenter_shifts(row_count, width, sum, sum_sq, shift);
          shifted_row_sums_again(x, channels, r0, r1, c0, width, shift, sum, sum_sq);
        }
        for (int64_t j0 = 0; j0 < width; j0 += kParamBlock) {
          const int64_t n = std::min(kParamBlock, width - j0);
          Moments<acc_t> moments[kParamBlock];
          for (int64_t j = j0; j < j0 + n; ++j) {
            moments[j - j0] = moments_from_shifted_sums<acc_t>(row_count, shift[j], sum[j], sum_sq[j]);
          }
          finish(c0 + j0, n, moments);
        }
      }
    });
  };
  run_tasks();
  if (one_part) {
    return;
  }
  // Each channel's sums over all parts.
  const auto totals = uninitialized_array<acc_t>(2 * channels);
  const auto add_parts = [&] {
    for_channel_blocks(channels, [&](int64_t c0, int64_t n) {
      acc_t sum[kParamBlock] = {};  // local: the loop keeps them apart from the parts' sums
      acc_t sum_sq[kParamBlock] = {};
      for (int64_t part = 0; part < partition.num_parts; ++part) {
        const acc_t* sums = part_sums.get() + 2 * part * channels + c0;
        for (int64_t j = 0; j < n; ++j) {
          sum[j] += sums[j];
          sum_sq[j] += sums[channels + j];
        }
      }
      std::copy_n(sum, n, totals.get() + c0);
      std::copy_n(sum_sq, n, totals.get() + channels + c0);
    });
  };
  add_parts();
  // Channels whose shift lay too far from their mean: every channel is summed again, those around
  // their mean (a second pass over the input, for inputs whose first rows are outliers).
  if (any_shift_too_far(row_count, channels, totals.get(), totals.get() + channels)) {
    recenter_shifts(row_count, channels, totals.get(), totals.get() + channels, shifts.data());
    run_tasks();
    add_parts();
  }
  for_channel_blocks(channels, [&](int64_t c0, int64_t n) {
    Moments<acc_t> moments[kParamBlock];
    for (int64_t j = 0; j < n; ++j) {
      const int64_t c = c0 + j;
      moments[j] = moments_from_shifted_sums<acc_t>(row_count, shifts[c], totals[c], totals[channels + c]);
    }
    finish(c0, n, moments);
  });
}

// Rows shorter than this many bytes keep add_rows in grad_sums_in_order.
constexpr int64_t kMinInOrderRowBytes = 256;

// Whether rows_grad_sums walks its rows in memory order (add_rows_in_order) rather than by chunks
// of channels (add_rows), whose sums stay in registers: faster while the inputs come from the
// caches near the threads, but slow on long rows read from farther. On an AMD EPYC (Zen 3),
// float32 channels_last, 2 threads: the sums of 8x256x56x56 took 3.0 -> 1.9 ms, its backward 4.33
// -> 4.11 ms in the benchmark (1 thread 7.61 -> 6.92 ms), 8x64x112x112 3.77 -> 3.55 ms and
// 8x512x28x28 2.53 -> 2.44 ms; where the inputs fit (8x1024x14x14, 12.8 MB) the sums took 1.2-1.7x
// the time in memory order. Those figures predate working prefetches (prefetch_values); with them
// on both sides, memory order still gained 1.0-1.5x (8x256x56x56 1.47-1.51x, 8x64x112x112
// 1.00-1.15x, 8x512x28x28 1.08-1.34x on 1 and 2 threads), and bfloat16 still came out even. On a
// Zen 4 (AVX-512), against add_rows with prefetches: 8x256x56x56 backward 4.14 -> 2.95 ms on 2
// threads (7.34 -> 5.25 ms on 1), 8x512x28x28 1.39 -> 1.12 ms (3.03 -> 2.50 ms); bfloat16 mixed
// (0.91-1.24x), so it keeps add_rows. Rows of one chunk (rows_prefetched) keep add_rows, which
// reads them in memory order already. Intel CPUs were not measured with this choice.
template <typename scalar_t>
bool grad_sums_in_order(const Layout& layout) {
  const int64_t row_bytes = layout.channels * static_cast<int64_t>(sizeof(scalar_t));
  return std::is_same_v<scalar_t, float> && row_bytes >= kMinInOrderRowBytes && rows_prefetched<scalar_t>(layout);
}

// sum(dy) and sum(dy * (x - mean)) of every channel of a rows tensor, by fixed tasks, into sum_dy
// and sum_dy_xmu (zero on entry). Several parts are summed apart, then added in order; a single
// part's task calls after_block(c0, c1) once it has summed channels [c0, c1) (with `stream`, what
// it writes by streaming stores is fenced). With `dx`, the same sweep stores dx = dy * dy_scale[c]
// (channel order), an eval backward's input gradient, which needs no sums: dy is read once.
template <typename opmath_t, typename acc_t, typename scalar_t, typename AfterBlock>
void rows_grad_sums(const scalar_t* dy, const scalar_t* x, const Layout& layout, const opmath_t* mean, acc_t* sum_dy,
                    acc_t* sum_dy_xmu, bool stream, const AfterBlock& after_block, scalar_t* dx = nullptr,
                    const opmath_t* dy_scale = nullptr) {
  const int64_t channels = layout.channels;
  const RowPartition partition(layout);
  const bool one_part = partition.num_parts == 1;
  // Per part (each task zeroes its own slots, in parallel and into its cache).
  const auto part_dy = uninitialized_array<acc_t>(one_part ? 0 : partition.num_parts * channels);
  const auto part_dy_xmu = uninitialized_array<acc_t>(one_part ? 0 : partition.num_parts * channels);
  const bool in_order = grad_sums_in_order<scalar_t>(layout);
  // Rows wider than a chunk are prefetched where they come from far, and where the sweep also
  // stores dx: channels_last 8x1024x14x14 eval backward 0.89x the time on 1 thread, 0.93x on 2
  // (AMD EPYC Zen 4, in-process).
  const bool prefetch_ahead =
      rows_wider_than_chunk<scalar_t>(layout) && (dx != nullptr || rows_read_from_far<scalar_t>(layout));
  with_flag(dx != nullptr, [&](auto stores_dx) {
    parallel_for_output(0, partition.num_tasks(), 1, stream, [&](int64_t task_begin, int64_t task_end) {
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t part = partition.part(task);
        const int64_t c0 = partition.channel_begin(task);
        const int64_t c1 = partition.channel_end(task);
        const int64_t width = c1 - c0;
        const opmath_t* block_mean = mean + c0;
        const scalar_t* dy_block = dy + c0;
        const scalar_t* x_block = x + c0;
        scalar_t* dx_block = dx == nullptr ? nullptr : dx + c0;
        const opmath_t* block_dy_scale = dy_scale == nullptr ? nullptr : dy_scale + c0;
        const int64_t offset = one_part ? c0 : part * channels + c0;
        if (!one_part) {
          std::fill_n(part_dy.get() + offset, width, acc_t(0));
          std::fill_n(part_dy_xmu.get() + offset, width, acc_t(0));
        }
        acc_t* block_dy = (one_part ? sum_dy : part_dy.get()) + offset;
        acc_t* block_dy_xmu = (one_part ? sum_dy_xmu : part_dy_xmu.get()) + offset;
        const int64_t r0 = partition.row_begin(part);
        const int64_t r1 = partition.row_begin(part + 1);
        const auto terms = [&](int64_t r, int64_t j, auto& s_dy, auto& s_dy_xmu) {
          using T = std::decay_t<decltype(s_dy)>;
          const int64_t i = r * channels + j;
          const T g = load_as<T>(dy_block + i);
          s_dy = s_dy + g;
          s_dy_xmu = multiply_add(g, load_as<T>(x_block + i) - load_as<T>(block_mean + j), s_dy_xmu);
          if constexpr (decltype(stores_dx)::value) {
            store_output(dx_block + i, g * load_as<T>(block_dy_scale + j), stream);
          }
        };
        const auto prefetch = [&](int64_t r, int64_t j, int64_t count) __attribute__((always_inline)) {
          prefetch_values(dy_block + r * channels + j, count);
          prefetch_values(x_block + r * channels + j, count);
        };
        if (in_order) {  // only on inputs read from far
          add_rows_in_order<scalar_t>(r0, r1, width, block_dy, block_dy_xmu, terms, prefetch);
        } else {
          add_rows_prefetching_if<scalar_t>(prefetch_ahead, r0, r1, width, block_dy, block_dy_xmu, terms, prefetch);
        }
        if (one_part) {
          after_block(c0, c1);
        }
      }
    });
  });
  if (one_part) {
    return;
  }
  for_channel_blocks(channels, [&](int64_t c0, int64_t n) {
    for (int64_t part = 0; part < partition.num_parts; ++part) {
      for (int64_t c = c0; c < c0 + n; ++c) {
        sum_dy[c] += part_dy[part * channels + c];
        sum_dy_xmu[c] += part_dy_xmu[part * channels + c];
      }
    }
  });
}

// Columns a rows view has at least (four vectors of floats), unless that would take more than
// kChannelBlock.
constexpr int64_t kMinColumns = 64;

// A tensor read as rows of `width` columns ("wide rows"), column j belonging to channel
// (j % period) / inner (for_each_column): `period` values (C * inner) hold every channel once,
// inner values each (a row of a rows tensor, an image of a planar one), and a wide row is
// width / period of them, so that it is whole vectors and at least kMinColumns long. The tensor's
// last `leftover` values, fewer than a wide row, follow the last whole one.
//
// Sums then run down the columns in whole vectors (rows_moments, rows_grad_sums) and the columns
// of each channel are merged. A planar tensor with planes shorter than a vector is read so, as are
// short planes of a large batch (planes_as_columns); channel by channel each plane would be a few
// values summed one at a time (on 2 threads with AVX-512: (64, 256, 2, 2) statistics 34 -> 12 us,
// (128, 64, 3, 3) 28 -> 14 us). So is a rows tensor whose rows are not whole vectors (narrow_rows):
// row by row, each row's tail went one value at a time (16x3x224x224 channels_last eval 1.45 ->
// 0.37 ms on 2 threads).
struct Columns {
  int64_t channels;
  int64_t inner;
  int64_t period;
  int64_t width;
  int64_t num_rows;  // whole wide rows
  int64_t leftover;  // values after them, a multiple of period

  explicit Columns(const Layout& layout)
      : channels(layout.channels),
        inner(layout.rows ? 1 : layout.inner),
        period(channels * inner),
        width(wide_row(period)),
        num_rows((layout.rows ? layout.num_rows : layout.batch) / (width / period)),
        leftover((layout.rows ? layout.num_rows : layout.batch) % (width / period) * period) {}

  // The whole wide rows as a rows tensor of `width` channels (the columns).
  Layout layout() const { return Layout{/*rows=*/true, width, num_rows, 1, num_rows}; }
  // body(j, c) for `count` columns from the first (a multiple of period), c the channel of column
  // j, in order; without a division per column (25088 of them took 64 us).
  template <typename Body>
  void for_each_column(int64_t count, const Body& body) const {
    for (int64_t j = 0; j < count;) {
      for (int64_t c = 0; c < channels; ++c) {
        for (int64_t i = 0; i < inner; ++i, ++j) {
          body(j, c);
        }
      }
    }
  }
  // Offset of the leftover values.
  int64_t leftover_begin() const { return num_rows * width; }

  // values[c] for every column j of channel c, with room for kMaxLanes more.
  template <typename T>
  std::vector<T> tile(const T* values) const {
    std::vector<T> tiled(width + kMaxLanes);
    for_each_column(width, [&](int64_t j, int64_t c) { tiled[j] = values[c]; });
    return tiled;
  }

 private:
  static int64_t wide_row(int64_t period) {
    if (period % kMaxLanes == 0 && period >= kMinColumns) {
      return period;
    }
    const int64_t unit = std::lcm(period, kMaxLanes);
    const int64_t width = (kMinColumns + unit - 1) / unit * unit;
    return width <= kChannelBlock ? width : period;
  }
};

// Whether a rows tensor is read as wider rows (Columns) for its sums and elementwise passes: rows
// that are not whole vectors. Rows of 16, 32 or 48 channels keep their own path: read as rows of
// 64 columns, (256, 16, 16, 16) channels_last backward went 0.42 -> 0.46 ms.
bool narrow_rows(const Layout& layout) {
  return layout.rows && layout.channels % kMaxLanes != 0 && Columns(layout).width != layout.channels;
}

// Moments of every channel of a tensor read as Columns: each column's over the whole wide rows (by
// rows_moments), merged per channel, then with the leftover values' (Welford's updates, in
// order). Merged one column at a time (merge), with a division each, (32, 512, 3, 3) statistics
// took 39 us rather than 31.
template <typename opmath_t, typename acc_t, typename scalar_t>
std::vector<Moments<acc_t>> column_moments(const scalar_t* x, const Columns& columns) {
  std::vector<Moments<acc_t>> per_column(columns.width);
  if (columns.num_rows > 0) {
    rows_moments<opmath_t, acc_t>(x, columns.layout(), /*stream=*/false,
                                  [&](int64_t j0, int64_t n, const Moments<acc_t>* moments) {
                                    std::copy_n(moments, n, per_column.data() + j0);
                                  });
  }
  const int64_t repeats = columns.width / columns.period;
  std::vector<Moments<acc_t>> parts(repeats * columns.inner);
  std::vector<Moments<acc_t>> channels(columns.channels);
  for (int64_t c = 0; c < columns.channels; ++c) {
    if (columns.num_rows > 0) {
      for (int64_t t = 0; t < repeats; ++t) {
        std::copy_n(per_column.data() + t * columns.period + c * columns.inner, columns.inner,
                    parts.data() + t * columns.inner);
      }
      channels[c] = merge_equal_counts(parts.data(), static_cast<int64_t>(parts.size()));
    }
    if (columns.leftover > 0) {
      Moments<acc_t> rest;
      const scalar_t* values = x + columns.leftover_begin() + c * columns.inner;
      for (int64_t r = 0; r < columns.leftover; r += columns.period) {
        for (int64_t i = 0; i < columns.inner; ++i) {
          add_value(rest, static_cast<acc_t>(values[r + i]));
        }
      }
      channels[c] = merge(channels[c], rest);  // channels[c] is empty without whole rows
    }
  }
  return channels;
}

// sum(dy) and sum(dy * (x - mean[j])) of each column j of a rows tensor, into column_dy and
// column_dy_xmu (zero on entry), with every term in the accumulation type's lanes (float64 for
// float32): x - mean and its product with dy are not rounded to float, and no float lane sums a
// run of terms. Columns are few channels' long sums: (3, 2, 9000) channels_last weight gradients
// summed in float lanes of 8 terms each came out a median twice as far from float64 as torch's,
// up to 5 times, over 12 seeds of the accuracy test (now a median 0.5 times).
template <typename opmath_t, typename acc_t, typename scalar_t>
void exact_column_grad_sums(const scalar_t* dy, const scalar_t* x, const Layout& layout, const opmath_t* mean,
                            acc_t* column_dy, acc_t* column_dy_xmu) {
  using Vec = OpVec<scalar_t>;
  using Totals = LaneTotals<scalar_t>;
  using AccVec = typename Totals::AccVec;
  constexpr int64_t kSize = Vec::size();
  constexpr int64_t kParts = Totals::kParts;
  const int64_t width = layout.channels;
  const RowPartition partition(layout);
  std::vector<acc_t> part_sums(2 * partition.num_parts * width, acc_t(0));
  at::parallel_for(0, partition.num_tasks(), 1, [&](int64_t task_begin, int64_t task_end) {
    for (int64_t task = task_begin; task < task_end; ++task) {
      const int64_t part = partition.part(task);
      const int64_t row_end = partition.row_begin(part + 1);
      acc_t* part_dy = part_sums.data() + 2 * part * width;
      acc_t* part_dy_xmu = part_dy + width;
      for (int64_t r0 = partition.row_begin(part); r0 < row_end; r0 += kFlushEvery) {
        const int64_t r1 = std::min(row_end, r0 + kFlushEvery);
        const int64_t c1 = partition.channel_end(task);
        int64_t j = partition.channel_begin(task);
        for (; j + kSize <= c1; j += kSize) {
          const std::array<AccVec, kParts> m = Totals::widen(Vec::loadu(mean + j));
          std::array<AccVec, kParts> s_dy, s_dy_xmu;
          for (int64_t k = 0; k < kParts; ++k) {
            s_dy[k] = AccVec::loadu(part_dy + j + k * AccVec::size());
            s_dy_xmu[k] = AccVec::loadu(part_dy_xmu + j + k * AccVec::size());
          }
          for (int64_t r = r0; r < r1; ++r) {
            const std::array<AccVec, kParts> g = Totals::widen(load_vec(dy + r * width + j));
            const std::array<AccVec, kParts> v = Totals::widen(load_vec(x + r * width + j));
            for (int64_t k = 0; k < kParts; ++k) {
              s_dy[k] = s_dy[k] + g[k];
              s_dy_xmu[k] = at::vec::fmadd(g[k], v[k] - m[k], s_dy_xmu[k]);
            }
          }
          for (int64_t k = 0; k < kParts; ++k) {
            s_dy[k].store(part_dy + j + k * AccVec::size());
            s_dy_xmu[k].store(part_dy_xmu + j + k * AccVec::size());
          }
        }
        for (; j < c1; ++j) {  // columns past the last whole vector (wide rows of an odd period)
          for (int64_t r = r0; r < r1; ++r) {
            const acc_t g = static_cast<acc_t>(dy[r * width + j]);
            part_dy[j] += g;
            part_dy_xmu[j] =
                multiply_add(g, static_cast<acc_t>(x[r * width + j]) - static_cast<acc_t>(mean[j]), part_dy_xmu[j]);
          }
        }
      }
    }
  });
  for (int64_t part = 0; part < partition.num_parts; ++part) {
    for (int64_t j = 0; j < width; ++j) {
      column_dy[j] += part_sums[2 * part * width + j];
      column_dy_xmu[j] += part_sums[(2 * part + 1) * width + j];
    }
  }
}

// sum(dy) and sum(dy * (x - mean)) of every channel of a tensor read as Columns, added into sum_dy
// and sum_dy_xmu: each column's over the whole wide rows, added per channel in column order, then
// the leftover values'. Narrow rows' columns sum in float64 lanes (exact_column_grad_sums); short
// planes' in float lanes (rows_grad_sums), faster on their wider rows ((32, 512, 3, 3): 4608
// columns, backward 0.090 ms rather than 0.100 ms) and within a factor 2 of torch's accuracy in the
// tests.
template <typename opmath_t, typename acc_t, typename scalar_t>
void column_grad_sums(const scalar_t* dy, const scalar_t* x, const Columns& columns, const opmath_t* mean,
                      acc_t* sum_dy, acc_t* sum_dy_xmu) {
  if (columns.num_rows > 0) {
    const std::vector<opmath_t> column_mean = columns.tile(mean);
    std::vector<acc_t> column_dy(columns.width, acc_t(0));
    std::vector<acc_t> column_dy_xmu(columns.width, acc_t(0));
    if (columns.inner == 1) {
      exact_column_grad_sums<opmath_t, acc_t>(dy, x, columns.layout(), column_mean.data(), column_dy.data(),
                                              column_dy_xmu.data());
    } else {
      rows_grad_sums<opmath_t, acc_t>(dy, x, columns.layout(), column_mean.data(), column_dy.data(),
                                      column_dy_xmu.data(), /*stream=*/false, [](int64_t, int64_t) {});
    }
    columns.for_each_column(columns.width, [&](int64_t j, int64_t c) {
      sum_dy[c] += column_dy[j];
      sum_dy_xmu[c] += column_dy_xmu[j];
    });
  }
  const int64_t begin = columns.leftover_begin();
  columns.for_each_column(columns.leftover, [&](int64_t j, int64_t c) {
    const acc_t g = static_cast<acc_t>(dy[begin + j]);
    sum_dy[c] += g;
    sum_dy_xmu[c] = multiply_add(g, static_cast<acc_t>(x[begin + j]) - static_cast<acc_t>(mean[c]), sum_dy_xmu[c]);
  });
}

// Per-channel normalize coefficients repeated for every column of `columns` (Columns::tile).
template <typename opmath_t>
ChannelAffines<opmath_t> tile_affines(const ChannelAffines<opmath_t>& affines, const Columns& columns) {
  ChannelAffines<opmath_t> tiled(columns.width);
  columns.for_each_column(columns.width, [&](int64_t j, int64_t c) { tiled.set(j, affines.get(c)); });
  return tiled;
}

// y = (x - center) * scale + shift over a narrow rows tensor, by its wide rows (Columns) with each
// column's coefficients (`tiled`), then its leftover values. `after_reduction`: see
// normalize_all_rows.
template <typename opmath_t, typename scalar_t>
void normalize_columns(const scalar_t* x, scalar_t* y, const Columns& columns, const ChannelAffines<opmath_t>& tiled,
                       bool stream, bool after_reduction) {
  if (columns.num_rows > 0) {
    normalize_all_rows(x, y, columns.layout(), tiled, stream, after_reduction);
  }
  if (columns.leftover > 0) {
    const int64_t begin = columns.leftover_begin();
    normalize_rows(x + begin, y + begin, columns.width, RowBlock{0, 1, 0, columns.leftover}, tiled, /*stream=*/false);
  }
}

// Runs of images a planar tensor of fewer than kFewChannels channels sums each channel in:
// enough for this many tasks in all.
constexpr int64_t kMinPlanarTasks = 16;
// With as many channels or more, each channel is summed in one run: in runs, 8x8x56x56 trained in
// 0.038 ms rather than 0.033 ms (a shift, a flush and a merge per run), and 5 channels on 2
// threads are split 3:2 at worst.
constexpr int64_t kFewChannels = 4;

// A planar tensor's channels, each summed in `chunks` runs of images (run k of channel c is task
// c * chunks + k: images [image_begin(task), image_end(task))), and the runs' sums merged in
// order. Channels are one run unless there are fewer than kFewChannels of them. The runs follow
// from the shape alone, and so do the results; the schedule follows from the thread count
// (split_tasks). Split by channel alone, 3 channels left one of 2 threads half idle:
// 16x3x224x224 training forward 0.82 -> 0.58 ms and backward 1.27 -> 0.98 ms as split tasks.
struct PlanarSplit {
  int64_t channels;
  int64_t batch;
  int64_t chunks;

  explicit PlanarSplit(const Layout& layout)
      : channels(layout.channels),
        batch(layout.batch),
        chunks(channels < kFewChannels ? std::min(batch, (kMinPlanarTasks + channels - 1) / channels) : 1) {}

  int64_t num_tasks() const { return channels * chunks; }
  int64_t channel(int64_t task) const { return task / chunks; }
  int64_t image_begin(int64_t task) const { return task % chunks * batch / chunks; }
  int64_t image_end(int64_t task) const { return (task % chunks + 1) * batch / chunks; }

  // Whether the runs are tasks of their own, in two parallel passes (sums, then the elementwise
  // pass), rather than each channel one task that sums its runs and then normalizes (or
  // back-propagates) the channel while it is in cache: where the channels do not spread evenly
  // over the threads. On 2 threads, (8, 2, 128, 128) trained in 0.044 ms channel by channel and
  // 0.049 ms as split tasks.
  bool split_tasks() const { return chunks > 1 && channels % at::get_num_threads() != 0; }

  // body(task) over the tasks in parallel, each thread's tasks last first: a pass after the
  // sums over the same tasks starts on the planes they read last, still in the core's cache. With
  // `stream`, each thread fences its streaming stores.
  template <typename Body>
  void for_tasks_last_first(bool stream, const Body& body) const {
    parallel_for_output(0, num_tasks(), 1, stream, [&](int64_t begin, int64_t end) {
      for (int64_t task = end - 1; task >= begin; --task) {
        body(task);
      }
    });
  }
};

// Values per tensor in a block of planar_blocks, at most: 128 KB of float32, so that a block of x
// and dy stays in a 512 KB L2 between the backward's sums and its input gradient.
constexpr int64_t kPlaneBlockValues = 32768;

// Whether the pass after a planar tensor's per-channel sums walks it in blocks of channels, each
// in memory order (planar_blocks), rather than channel by channel right after each channel's sums:
// planes shorter than kMinStreamedPlane values, in tensors that, with the pass's other operands
// (`bytes` in all), do not fit in the caches near the threads. A channel of such planes is short
// runs a whole image apart, whose scattered writes the hardware prefetchers do not anticipate.
// Used by the backward: on an AMD EPYC (Zen 3, 32 MB of L3), the median backward of 8x1024x14x14
// (19 MB of dy, x and dx) took 0.79-0.85x the time in blocks, 16x1024x14x14 0.86-0.92x (1 and 2
// threads; 32x2048x7x7 at par). Where the tensors fit in the L3, blocks lost to the channel's
// planes still being in L1 after its sums: 8x512x7x7 and 8x2048x7x7 1.06-1.16x, and so did the
// training forward there (8x512x7x7 1.2x).
bool planes_in_channel_blocks(const Layout& layout, int64_t bytes) {
  return !layout.rows && layout.inner < kMinStreamedPlane && !fits_in_near_caches(bytes);
}

// Channels per block of planar_blocks for a pass over `bytes` in all: 1 (channel by channel) unless
// planes_in_channel_blocks, else a block of at most kPlaneBlockValues per tensor, narrower where
// needed to give each thread 4 blocks.
int64_t plane_block_width(const Layout& layout, int64_t bytes) {
  if (!planes_in_channel_blocks(layout, bytes)) {
    return 1;
  }
  const int64_t per_thread = std::max<int64_t>(1, layout.channels / (4 * at::get_num_threads()));
  return std::clamp<int64_t>(kPlaneBlockValues / std::max<int64_t>(1, layout.batch * layout.inner), 1, per_thread);
}

// In parallel, block by block of `width` channels [c0, c1): channel(c) for each of them (its
// sums), then images(c, n0, n1) over the block's planes in memory order, the block's planes still
// in cache. A block of one channel takes all its images in one call.
template <typename Channel, typename Images>
void planar_blocks(const Layout& layout, int64_t width, bool stream, const Channel& channel, const Images& images) {
  const int64_t num_blocks = (layout.channels + width - 1) / width;
  const int64_t images_per_step = width == 1 ? layout.batch : 1;
  parallel_for_output(0, num_blocks, 1, stream, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t c0 = block * width;
      const int64_t c1 = std::min(layout.channels, c0 + width);
      for (int64_t c = c0; c < c1; ++c) {
        channel(c);
      }
      for (int64_t n = 0; n < layout.batch; n += images_per_step) {
        for (int64_t c = c0; c < c1; ++c) {
          images(c, n, std::min(layout.batch, n + images_per_step));
        }
      }
    }
  });
}

// Moments of channel c of a planar tensor: its runs' (PlanarSplit), merged in order.
template <typename scalar_t>
auto split_channel_moments(const scalar_t* x, const Layout& layout, const PlanarSplit& split, int64_t c) {
  decltype(planar_channel_moments(x, layout, c)) moments;
  for (int64_t task = c * split.chunks; task < (c + 1) * split.chunks; ++task) {
    moments = merge(moments, planar_channel_moments(x, layout, c, split.image_begin(task), split.image_end(task)));
  }
  return moments;
}

// The same for every channel, each run a task (PlanarSplit::split_tasks), merged in the same order.
template <typename acc_t, typename scalar_t>
std::vector<Moments<acc_t>> split_planar_moments(const scalar_t* x, const Layout& layout, const PlanarSplit& split) {
  std::vector<Moments<acc_t>> parts(split.num_tasks());
  at::parallel_for(0, split.num_tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      parts[task] = planar_channel_moments(x, layout, split.channel(task), split.image_begin(task), split.image_end(task));
    }
  });
  std::vector<Moments<acc_t>> channels(split.channels);
  for (int64_t task = 0; task < split.num_tasks(); ++task) {
    channels[split.channel(task)] = merge(channels[split.channel(task)], parts[task]);
  }
  return channels;
}

// sum(dy) and sum(dy * (x - mean)) of channel c of a planar tensor: its runs' (PlanarSplit), added
// in order to zero; with `dx`, its input gradient too (planar_channel_grad_sums).
template <typename acc_t, typename scalar_t, typename opmath_t>
std::pair<acc_t, acc_t> split_channel_grad_sums(const scalar_t* dy, const scalar_t* x, const Layout& layout,
                                                const PlanarSplit& split, int64_t c, opmath_t mean,
                                                scalar_t* dx, opmath_t dy_scale, bool stream) {
  std::pair<acc_t, acc_t> sums{0, 0};
  for (int64_t task = c * split.chunks; task < (c + 1) * split.chunks; ++task) {
    const auto [sum_dy, sum_dy_xmu] = planar_channel_grad_sums(dy, x, layout, c, mean, split.image_begin(task),
                                                               split.image_end(task), dx, dy_scale, stream);
    sums.first += sum_dy;
    sums.second += sum_dy_xmu;
  }
  return sums;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train(const Tensor& input, const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias, double eps) {
  check_train_args(input, weight, bias, eps);
  const auto [x, layout] = kernel_view(input);
  const auto stats_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  Tensor output = at::empty_like(x);
  const bool stream = train_streams(output, layout);
  Tensor save_mean = at::empty({layout.channels}, stats_options);
  Tensor save_invstd = at::empty({layout.channels}, stats_options);
  if (layout.num_rows == 0) {
    save_mean.zero_();
    save_invstd.zero_();
    return {output, save_mean, save_invstd};
  }
  const ChannelValues weight_values(weight, 1.0);
  const ChannelValues bias_values(bias, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_batch_norm_train", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = output.mutable_data_ptr<scalar_t>();
    opmath_t* mean_data = save_mean.mutable_data_ptr<opmath_t>();
    opmath_t* invstd_data = save_invstd.mutable_data_ptr<opmath_t>();
    // Channel c's saved statistics, and its normalize coefficients.
    const auto finish_channel = [&](int64_t c, const Moments<acc_t>& moments, double w, double b) {
      const double mean = moments.mean;
      const double invstd = inverse_std(double(moments.m2) / double(moments.count), eps);
      mean_data[c] = static_cast<opmath_t>(mean);
      invstd_data[c] = static_cast<opmath_t>(invstd);
      return folding_affine<opmath_t>(mean, invstd, w, b);
    };
    // Every channel's saved statistics and coefficients, from all their moments.
    const auto all_affines = [&](const std::vector<Moments<acc_t>>& moments) {
      ChannelAffines<opmath_t> affines(layout.channels);
      for_channel_blocks(layout.channels, [&](int64_t c0, int64_t n) {
        double w[kParamBlock], b[kParamBlock];
        weight_values.read(c0, n, w);
        bias_values.read(c0, n, b);
        for (int64_t j = 0; j < n; ++j) {
          affines.set(c0 + j, finish_channel(c0 + j, moments[c0 + j], w[j], b[j]));
        }
      });
      return affines;
    };
    // A planar tensor normalized in memory order, after every channel's sums.
    const auto normalize_in_order = [&](ChannelAffines<opmath_t>& affines) {
      affines.wrap(layout.channels);
      const bool stream_in_order = train_streams(output, layout, /*in_memory_order=*/true);
      normalize_planes_in_order(x_data, y_data, layout, affines, stream_in_order);
    };
    const bool as_columns = planes_as_columns(layout, OpVec<scalar_t>::size());
    if (as_columns || narrow_rows(layout)) {
      const Columns columns(layout);
      ChannelAffines<opmath_t> affines = all_affines(column_moments<opmath_t, acc_t>(x_data, columns));
      if (as_columns) {
        normalize_in_order(affines);
      } else {
        const bool stream_columns = train_streams(output, columns.layout());
        normalize_columns(x_data, y_data, columns, tile_affines(affines, columns), stream_columns,
                          /*after_reduction=*/RowPartition(columns.layout()).num_parts > 1);
      }
      return;
    }
    if (!layout.rows) {
      const PlanarSplit split(layout);
      if (short_planes_after_sums(layout)) {
        ChannelAffines<opmath_t> affines = all_affines(split_planar_moments<acc_t>(x_data, layout, split));
        normalize_in_order(affines);
        return;
      }
      if (split.split_tasks()) {
        // Statistics per run of images, merged per channel, then each run normalized.
        const ChannelAffines<opmath_t> affines = all_affines(split_planar_moments<acc_t>(x_data, layout, split));
        split.for_tasks_last_first(stream, [&](int64_t task) {
          const int64_t c = split.channel(task);
          normalize_channel(x_data, y_data, layout, c, affines.get(c), stream, split.image_begin(task),
                            split.image_end(task));
        });
        return;
      }
      // Channel by channel: the normalize pass re-reads the channel while the statistics pass left it in cache.
      const std::vector<double> w = all_channels<double>(weight_values, layout.channels);
      const std::vector<double> b = all_channels<double>(bias_values, layout.channels);
      parallel_for_output(0, layout.channels, 1, stream, [&](int64_t c_begin, int64_t c_end) {
        for (int64_t c = c_begin; c < c_end; ++c) {
          const auto affine = finish_channel(c, split_channel_moments(x_data, layout, split, c), w[c], b[c]);
          normalize_channel(x_data, y_data, layout, c, affine, stream);
        }
      });
      return;
    }
    // With a single part, rows_moments finishes each block of channels in the task that summed
    // it: the block is normalized there, its rows still in cache ((8, 8192) 45 -> 37 us).
    const bool fused = RowPartition(layout).num_parts == 1;
    ChannelAffines<opmath_t> affines(layout.channels, /*lane_order=*/kInterleavedPairs<scalar_t>);
    rows_moments<opmath_t, acc_t>(
        x_data, layout, fused && stream, [&](int64_t c0, int64_t n, const Moments<acc_t>* moments) {
          double w[kParamBlock], b[kParamBlock];
          weight_values.read(c0, n, w);
          bias_values.read(c0, n, b);
          for (int64_t j = 0; j < n; ++j) {
            affines.set(c0 + j, finish_channel(c0 + j, moments[j], w[j], b[j]));
          }
          affines.put_in_lane_order(c0, c0 + n);
          if (fused) {
            normalize_rows(x_data, y_data, layout.channels, RowBlock{0, layout.num_rows, c0, c0 + n}, affines, stream);
          }
        });
    if (!fused) {
      normalize_all_rows(x_data, y_data, layout, affines, stream, /*after_reduction=*/true);
    }
  });
  return {output, save_mean, save_invstd};
}

// Per-channel mean and biased variance of the input, without normalizing (SyncBatchNorm's local pass).
std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  check_input(input);
  const auto [x, layout] = kernel_view(input);
  const auto stats_options = input.options().dtype(at::toOpMathType(input.scalar_type()));
  Tensor mean = at::zeros({layout.channels}, stats_options);
  Tensor var = at::zeros({layout.channels}, stats_options);
  if (layout.num_rows == 0) {
    return {mean, var};  // no values: count 0, which the merge across processes weighs by
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_batch_norm_stats", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    opmath_t* mean_data = mean.mutable_data_ptr<opmath_t>();
    opmath_t* var_data = var.mutable_data_ptr<opmath_t>();
    const auto store = [&](int64_t c, const auto& moments) {
      mean_data[c] = static_cast<opmath_t>(moments.mean);
      var_data[c] = static_cast<opmath_t>(double(moments.m2) / double(moments.count));
    };
    if (planes_as_columns(layout, OpVec<scalar_t>::size()) || narrow_rows(layout)) {
      const auto moments = column_moments<opmath_t, acc_t>(x_data, Columns(layout));
      for (int64_t c = 0; c < layout.channels; ++c) {
        store(c, moments[c]);
      }
      return;
    }
    if (!layout.rows) {
      const PlanarSplit split(layout);
      if (split.split_tasks()) {
        const auto moments = split_planar_moments<acc_t>(x_data, layout, split);
        for (int64_t c = 0; c < layout.channels; ++c) {
          store(c, moments[c]);
        }
        return;
      }
      at::parallel_for(0, layout.channels, 1, [&](int64_t c_begin, int64_t c_end) {
        for (int64_t c = c_begin; c < c_end; ++c) {
          store(c, split_channel_moments(x_data, layout, split, c));
        }
      });
      return;
    }
    rows_moments<opmath_t, acc_t>(x_data, layout, /*stream=*/false,
                                  [&](int64_t c0, int64_t n, const Moments<acc_t>* moments) {
                                    for (int64_t j = 0; j < n; ++j) {
                                      store(c0 + j, moments[j]);
                                    }
                                  });
  });
  return {mean, var};
}

// Whether a rows tensor has few rows (fewer than two parts' worth, RowPartition) of more channels than
// one block of coefficients: eval then takes it by blocks of channels.
bool few_wide_rows(const Layout& layout) {
  return layout.rows && !narrow_rows(layout) && layout.num_rows < 2 * kMinPartRows &&
         layout.channels > kCoefficientBlock;
}

Tensor batch_norm_eval(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                       const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
  check_eval_args(input, running_mean, running_var, weight, bias, eps);
  const auto [x, layout] = kernel_view(input);
  Tensor output = at::empty_like(x);
  if (x.numel() == 0) {
    return output;
  }
  const ChannelValues mean_values(running_mean, 0.0);
  const ChannelValues var_values(running_var, 1.0);
  const ChannelValues weight_values(weight, 1.0);
  const ChannelValues bias_values(bias, 0.0);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_batch_norm_eval", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const bool in_memory_order = planes_in_memory_order(layout);
    const bool stream = eval_streams(output, layout, in_memory_order);
    // The coefficients of channels [c0, c0 + n) into affines[offset + j].
    const auto set_affines = [&](ChannelAffines<opmath_t>& affines, int64_t c0, int64_t n, int64_t offset) {
      for (int64_t b0 = 0; b0 < n; b0 += kParamBlock) {
        const int64_t count = std::min(kParamBlock, n - b0);
        double mu[kParamBlock], var[kParamBlock], w[kParamBlock], b[kParamBlock];
        mean_values.read(c0 + b0, count, mu);
        var_values.read(c0 + b0, count, var);
        weight_values.read(c0 + b0, count, w);
        bias_values.read(c0 + b0, count, b);
        for (int64_t j = 0; j < count; ++j) {
          affines.set(offset + b0 + j, folding_affine<opmath_t>(mu[j], inverse_std(var[j], eps), w[j], b[j]));
        }
      }
      affines.put_in_lane_order(offset, offset + n);
    };
    const bool narrow = narrow_rows(layout);
    // Rows passes over the channels themselves (not as Columns) take their coefficients in lane order.
    const bool lane_order = kInterleavedPairs<scalar_t> && layout.rows && !narrow;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    scalar_t* y_data = output.mutable_data_ptr<scalar_t>();
    if (few_wide_rows(layout)) {
      // Each task takes a block of channels: their coefficients, then those channels of every
      // row. Computed for all channels first, in their own parallel pass over arrays of 3 x C
      // values, they took most of the time: (2, 65536) eval 0.132 ms against a 0.010 ms
      // elementwise pass.
      const int64_t num_blocks = (layout.channels + kCoefficientBlock - 1) / kCoefficientBlock;
      parallel_for_output(0, num_blocks, 1, stream, [&](int64_t block_begin, int64_t block_end) {
        ChannelAffines<opmath_t> block_affines(kCoefficientBlock, lane_order);
        for (int64_t block = block_begin; block < block_end; ++block) {
          const int64_t c0 = block * kCoefficientBlock;
          const int64_t n = std::min(kCoefficientBlock, layout.channels - c0);
          set_affines(block_affines, c0, n, 0);
          normalize_rows(x_data + c0, y_data + c0, layout.channels, RowBlock{0, layout.num_rows, 0, n},
                         block_affines, stream);
        }
      });
      return;
    }
    ChannelAffines<opmath_t> affines(layout.channels, lane_order);
    for_channel_blocks(layout.channels, [&](int64_t c0, int64_t n) { set_affines(affines, c0, n, c0); });
    if (narrow) {
      const Columns columns(layout);
      normalize_columns(x_data, y_data, columns, tile_affines(affines, columns),
                        eval_streams(output, columns.layout()),
                        /*after_reduction=*/false);
    } else if (layout.rows) {
      normalize_all_rows(x_data, y_data, layout, affines, stream, /*after_reduction=*/false);
    } else if (in_memory_order) {
      affines.wrap(layout.channels);
      normalize_planes_in_order(x_data, y_data, layout, affines, stream);
    } else {
      normalize_planar(x_data, y_data, layout, affines, stream);
    }
  });
  return output;
}

// Per-channel gradient sums reduced elsewhere (over every process of a SyncBatchNorm) and the
// number of values per channel they cover.
struct GivenSums {
  std::vector<double> sum_dy;
  std::vector<double> sum_dy_xmu;
  double count;
};

// The input gradient of a planar tensor in memory order (map_plane_blocks: planes under 256
// values), from each channel's coefficients in arrays of at least channels + kMaxLanes values
// (wrapped here).
template <typename opmath_t, typename scalar_t>
void input_grad_in_memory_order(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Layout& layout,
                                std::vector<opmath_t>& mean, std::vector<opmath_t>& dy_scale,
                                std::vector<opmath_t>& xmu_scale, std::vector<opmath_t>& shift, bool training,
                                bool stream) {
  using Vec = OpVec<scalar_t>;
  for (auto* values : {&mean, &dy_scale, &xmu_scale, &shift}) {
    wrap_channels(*values, layout.channels);
  }
  if (!training) {  // dx = dy * dy_scale
    map_plane_blocks<1>(dx, layout, stream, std::array<const opmath_t*, 1>{dy_scale.data()},
                        [=](const auto& load, const std::array<Vec, 1>& k) C10_ALWAYS_INLINE_ATTRIBUTE {
                          return load(dy) * k[0];
                        });
    return;
  }
  with_centering(any_nonzero(mean.data(), layout.channels), [&](auto centered) {
    map_plane_blocks<4>(
        dx, layout, stream,
        std::array<const opmath_t*, 4>{mean.data(), dy_scale.data(), xmu_scale.data(), shift.data()},
        [=](const auto& load, const std::array<Vec, 4>& k) C10_ALWAYS_INLINE_ATTRIBUTE {
          const Vec xmu_term = affine_map<decltype(centered)::value>(load(x), k[0], k[2], k[3]);
          return multiply_add(load(dy), k[1], xmu_term);
        });
  });
}

// The input gradient of a narrow rows tensor by its wide rows (Columns), each column with its
// channel's coefficients, then its leftover values.
template <typename opmath_t, typename scalar_t>
void input_grad_columns(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Columns& columns,
                        const opmath_t* mean, const opmath_t* dy_scale, const opmath_t* xmu_scale,
                        const opmath_t* shift, bool training, bool stream) {
  const std::vector<opmath_t> column_dy_scale = columns.tile(dy_scale);
  if (!training) {  // dx = dy * dy_scale
    normalize_columns(dy, dx, columns, scale_affines(column_dy_scale.data(), columns.width), stream,
                      /*after_reduction=*/false);
    return;
  }
  const std::vector<opmath_t> column_mean = columns.tile(mean);
  const std::vector<opmath_t> column_xmu_scale = columns.tile(xmu_scale);
  const std::vector<opmath_t> column_shift = columns.tile(shift);
  const RowGradients<opmath_t> g{column_mean.data(), column_dy_scale.data(), column_xmu_scale.data(),
                                 column_shift.data(), /*lane_order=*/false,
                                 any_nonzero(column_mean.data(), columns.width)};
  const int64_t width = columns.width;
  if (columns.num_rows > 0) {
    const int64_t grain = std::max<int64_t>(1, kGrainValues / width);
    parallel_for_output(0, columns.num_rows, grain, stream, [&](int64_t begin, int64_t end) {
      input_grad_rows(dy, x, dx, width, RowBlock{begin, end, 0, width}, g, stream);
    });
  }
  if (columns.leftover > 0) {
    const int64_t begin = columns.leftover_begin();
    input_grad_rows(dy + begin, x + begin, dx + begin, width, RowBlock{0, 1, 0, columns.leftover}, g,
                    /*stream=*/false);
  }
}

// Gradients of a forward; with `given`, the input gradient of a training forward from those sums
// rather than from this input's own.
std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& input,
                                            const std::optional<Tensor>& weight, const Tensor& mean,
                                            const Tensor& invstd, bool training, std::array<bool, 3> output_mask,
                                            const GivenSums* given) {
  const auto [x, layout] = kernel_view(input);
  const Tensor dy = as_layout(grad_output, layout);
  const bool has_weight = is_given(weight);
  const auto param_options = has_weight ? weight->options() : input.options();
  const auto skipped = [&](const at::TensorOptions& options) { return at::empty({0}, options); };
  Tensor grad_input = output_mask[0] ? at::empty_like(x) : skipped(input.options());
  const bool stream = output_mask[0] && streams(grad_input, layout);
  const bool need_sums = !given && (output_mask[1] || output_mask[2] || (training && output_mask[0]));

  const int64_t channels = layout.channels;
  std::vector<double> sum_dy = given ? given->sum_dy : std::vector<double>(channels, 0.0);
  std::vector<double> sum_dy_xmu = given ? given->sum_dy_xmu : std::vector<double>(channels, 0.0);
  const double count = given ? given->count : static_cast<double>(layout.num_rows);
  const ChannelValues weight_values(weight, 1.0);
  const ChannelValues mean_values(mean, 0.0);
  const ChannelValues invstd_values(invstd, 1.0);

  if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_batch_norm_backward", [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      using acc_t = acc_type<scalar_t>;
      const scalar_t* x_data = x.const_data_ptr<scalar_t>();
      const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
      scalar_t* dx_data = output_mask[0] ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
      const bool as_columns = planes_as_columns(layout, OpVec<scalar_t>::size());
      // Each channel's mean (for the sums), the centers of its input gradient's (x - mean) terms
      // (folded_gradient), and its input-gradient coefficients (arrays for rows and planes read as
      // Columns; other planes compute theirs channel by channel), with room for map_plane_blocks
      // to wrap them.
      std::vector<opmath_t> mean_op = all_channels<opmath_t>(mean_values, channels);
      mean_op.resize(channels + kMaxLanes);
      std::vector<opmath_t> grad_mean(channels + kMaxLanes);
      // The input gradient's coefficients of channel c, from its invstd and weight; its center into grad_mean.
      const auto gradient = [&](int64_t c, double invstd_c, double weight_c) {
        return folded_gradient(input_gradient(invstd_c, weight_c, sum_dy[c], sum_dy_xmu[c], count, training),
                               mean_op[c], invstd_c, grad_mean[c]);
      };
      // Short planes of a training backward: every channel's sums, then the input gradient in memory order.
      const bool short_planes_in_order = training && short_planes_after_sums(layout);
      const bool in_order = as_columns || short_planes_in_order;
      const int64_t coefficients = output_mask[0] && (layout.rows || in_order) ? channels + kMaxLanes : 0;
      std::vector<opmath_t> dy_scale(coefficients);
      std::vector<opmath_t> xmu_scale(coefficients);
      std::vector<opmath_t> shift(coefficients);
      // The input gradient's coefficients of channels [c0, c1).
      const auto set_gradients = [&](int64_t c0, int64_t c1) {
        for (int64_t b0 = c0; b0 < c1; b0 += kParamBlock) {
          const int64_t n = std::min(kParamBlock, c1 - b0);
          double invstd_block[kParamBlock], weight_block[kParamBlock];
          invstd_values.read(b0, n, invstd_block);
          weight_values.read(b0, n, weight_block);
          for (int64_t j = 0; j < n; ++j) {
            const InputGradient<opmath_t> g = gradient(b0 + j, invstd_block[j], weight_block[j]);
            dy_scale[b0 + j] = g.dy_scale;
            xmu_scale[b0 + j] = g.xmu_scale;
            shift[b0 + j] = g.shift;
          }
        }
      };
      const auto set_all_gradients = [&] {
        for_channel_blocks(channels, [&](int64_t c0, int64_t n) { set_gradients(c0, c0 + n); });
      };
      // Once every channel's sums are in: the input gradient of a planar tensor in memory order.
      const auto input_grad_in_order = [&] {
        set_all_gradients();
        input_grad_in_memory_order(dy_data, x_data, dx_data, layout, grad_mean, dy_scale, xmu_scale, shift, training,
                                   streams(grad_input, layout, /*in_memory_order=*/true));
      };
      // Eval's input gradient, dy * dy_scale, needs no sums: rows, and planes taken channel by
      // channel, store it in the sums' own sweep, which then reads dy once. On 2 threads of an AMD
      // EPYC Zen 4, float32 channels_last eval backward 0.68-0.91x the time (8x1024x14x14 0.69),
      // (4096, 256) and (256, 1024) 0.85x and 0.74x; 1 thread 0.79-1.05x, bfloat16 0.79-1.02x.
      const bool eval_with_sums = !training && output_mask[0] && need_sums;
      if (as_columns || narrow_rows(layout)) {
        // Summed as wide rows of columns, then the input gradient: planes' in memory order,
        // narrow rows' by wide rows.
        const Columns columns(layout);
        if (need_sums) {
          column_grad_sums<opmath_t, acc_t>(dy_data, x_data, columns, mean_op.data(), sum_dy.data(),
                                            sum_dy_xmu.data());
        }
        if (!output_mask[0]) {
          return;
        }
        if (as_columns) {
          input_grad_in_order();
        } else {
          set_all_gradients();
          input_grad_columns(dy_data, x_data, dx_data, columns, grad_mean.data(), dy_scale.data(), xmu_scale.data(),
                             shift.data(), training, streams(grad_input, columns.layout()));
        }
        return;
      }
      if (!layout.rows) {
        // Channel by channel, each channel's input gradient right after its sums, even in eval,
        // which needs no sums: in memory order (as eval's forward walks planes under 256 values),
        // its input gradient went 0.14 -> 0.20 ms on 8x2048x7x7 and 0.25 -> 0.34 ms on 8x1024x14x14
        // (Sapphire Rapids). Short planes of tensors beyond the near caches go in blocks of channels
        // instead (planes_in_channel_blocks), and a training backward's planes under 64 values in
        // memory order after all the sums (short_planes_after_sums). Eval's input gradient, where
        // the weight and bias gradients need the sums, comes with them in one sweep (but for blocks
        // of channels): on 2 threads of an AMD EPYC Zen 4, float32 eval backward 0.74-0.86x the
        // time on NCHW 8x64x56x56, 8x512x7x7 and 8x2048x7x7, 0.80x on 16x3x224x224 (split tasks).
        const std::vector<double> invstd_c = all_channels<double>(invstd_values, channels);
        const std::vector<double> weight_c = all_channels<double>(weight_values, channels);
        const PlanarSplit split(layout);
        const int64_t width = output_mask[0] ? plane_block_width(layout, 3 * static_cast<int64_t>(x.nbytes())) : 1;
        // Blocks of channels keep eval's input gradient a pass of its own, in memory order.
        const bool eval_in_sweep = eval_with_sums && (split.split_tasks() || width == 1);
        // Each channel's input-gradient coefficients; eval's need no sums and come before them.
        std::vector<InputGradient<opmath_t>> g(channels);
        const auto set_channel_gradient = [&](int64_t c) { g[c] = gradient(c, invstd_c[c], weight_c[c]); };
        if (!training) {
          for (int64_t c = 0; c < channels; ++c) {
            set_channel_gradient(c);
          }
        }
        scalar_t* const swept_dx = eval_in_sweep ? dx_data : nullptr;
        if (short_planes_in_order || split.split_tasks()) {
          // Sums per run of images (a channel's planes are one run unless split), added per channel
          // in order, then the input gradient: in memory order, or each run's.
          if (need_sums) {
            std::vector<std::pair<acc_t, acc_t>> parts(split.num_tasks());
            parallel_for_output(0, split.num_tasks(), 1, eval_in_sweep && stream, [&](int64_t begin, int64_t end) {
              for (int64_t task = begin; task < end; ++task) {
                const int64_t c = split.channel(task);
                parts[task] = planar_channel_grad_sums(dy_data, x_data, layout, c, mean_op[c], split.image_begin(task),
                                                       split.image_end(task), swept_dx, g[c].dy_scale, stream);
              }
            });
            for (int64_t task = 0; task < split.num_tasks(); ++task) {
              sum_dy[split.channel(task)] += parts[task].first;
              sum_dy_xmu[split.channel(task)] += parts[task].second;
            }
          }
          if (!output_mask[0] || eval_in_sweep) {
            return;
          }
          if (short_planes_in_order) {
            input_grad_in_order();
            return;
          }
          if (training) {
            for (int64_t c = 0; c < channels; ++c) {
              set_channel_gradient(c);
            }
          }
          split.for_tasks_last_first(stream, [&](int64_t task) {
            const int64_t c = split.channel(task);
            channel_input_grad(dy_data, x_data, dx_data, layout, c, split.image_begin(task), split.image_end(task),
                               grad_mean[c], g[c], training, stream);
          });
          return;
        }
        planar_blocks(
            layout, width, stream,
            [&](int64_t c) {
              if (need_sums) {
                std::tie(sum_dy[c], sum_dy_xmu[c]) = split_channel_grad_sums<double>(
                    dy_data, x_data, layout, split, c, mean_op[c], swept_dx, g[c].dy_scale, stream);
              }
              if (training) {
                set_channel_gradient(c);
              }
            },
            [&](int64_t c, int64_t n0, int64_t n1) {
              if (output_mask[0] && !eval_in_sweep) {
                channel_input_grad(dy_data, x_data, dx_data, layout, c, n0, n1, grad_mean[c], g[c], training, stream);
              }
            });
        return;
      }
      // The input gradient's coefficients and centers in lane order (for_each_row_channel); the sums
      // read the mean in channel order, from mean_op.
      constexpr bool lane_order = kInterleavedPairs<scalar_t>;
      const auto set_row_gradients = [&](int64_t c0, int64_t c1) {
        set_gradients(c0, c1);
        if (lane_order) {
          to_lane_order({&grad_mean, &dy_scale, &xmu_scale, &shift}, c0, c1);
        }
      };
      RowGradients<opmath_t> g{grad_mean.data(), dy_scale.data(), xmu_scale.data(), shift.data(), lane_order};
      // g for channels [c0, c1), once set: whether any of their centers is other than 0.
      const auto block_gradients = [&](int64_t c0, int64_t c1) {
        RowGradients<opmath_t> block = g;
        block.centered = any_nonzero(grad_mean.data() + c0, c1 - c0);
        return block;
      };
      // With a single part, each task of the sums goes on to its channels' input gradient, their
      // rows still in cache ((2, 65536) backward 284 -> 244 us, (64, 8192) 198 -> 157 us).
      const bool fused = training && output_mask[0] && need_sums && RowPartition(layout).num_parts == 1;
      if (eval_with_sums) {
        set_all_gradients();
      }
      if (need_sums) {
        rows_grad_sums<opmath_t, acc_t>(
            dy_data, x_data, layout, mean_op.data(), sum_dy.data(), sum_dy_xmu.data(),
            (fused || eval_with_sums) && stream,
            [&](int64_t c0, int64_t c1) {
              if (fused) {
                set_row_gradients(c0, c1);
                input_grad_rows(dy_data, x_data, dx_data, channels, RowBlock{0, layout.num_rows, c0, c1},
                                block_gradients(c0, c1), stream);
              }
            },
            eval_with_sums ? dx_data : nullptr, eval_with_sums ? dy_scale.data() : nullptr);
      }
      if (!output_mask[0] || fused || eval_with_sums) {
        return;
      }
      const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, channels));
      for_channel_blocks(channels, [&](int64_t c0, int64_t n) { set_row_gradients(c0, c0 + n); });
      g = block_gradients(0, channels);
      if (!training) {
        normalize_all_rows(dy_data, dx_data, layout, scale_affines(dy_scale.data(), channels, lane_order), stream,
                           /*after_reduction=*/false);
        return;
      }
      parallel_for_output(0, layout.num_rows, grain, stream, [&](int64_t begin, int64_t end) {
        if (!need_sums) {
          input_grad_rows(dy_data, x_data, dx_data, channels, RowBlock{begin, end, 0, channels}, g, stream);
          return;
        }
        rows_last_first(begin, end, channels, [&](int64_t block_begin, int64_t block_end) {
          input_grad_rows(dy_data, x_data, dx_data, channels, RowBlock{block_begin, block_end, 0, channels}, g,
                          stream);
        });
      });
    });
  }

  Tensor grad_weight = output_mask[1] ? at::empty({channels}, param_options) : skipped(param_options);
  Tensor grad_bias = output_mask[2] ? at::empty({channels}, param_options) : skipped(param_options);
  if (output_mask[1] || output_mask[2]) {
    const ChannelValues weight_out(grad_weight, 0.0);
    const ChannelValues bias_out(grad_bias, 0.0);
    for_channel_blocks(channels, [&](int64_t c0, int64_t n) {
      if (output_mask[1]) {
        double values[kParamBlock];
        invstd_values.read(c0, n, values);
        for (int64_t j = 0; j < n; ++j) {
          values[j] *= sum_dy_xmu[c0 + j];
        }
        weight_out.write(c0, n, values);
      }
      if (output_mask[2]) {
        bias_out.write(c0, n, sum_dy.data() + c0);
      }
    });
  }
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_output, const Tensor& input,
                                                       const std::optional<Tensor>& weight, const Tensor& mean,
                                                       const Tensor& invstd, bool training,
                                                       std::array<bool, 3> output_mask) {
  check_backward_args(grad_output, input, weight, mean, invstd);
  return backward(grad_output, input, weight, mean, invstd, training, output_mask, nullptr);
}

Tensor batch_norm_backward_elemt(const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& weight,
                                 const Tensor& mean, const Tensor& invstd, const Tensor& sum_dy,
                                 const Tensor& sum_dy_xmu, const Tensor& count) {
  check_backward_elemt_args(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count);
  const int64_t channels = input.size(1);
  const GivenSums given{all_channels<double>(ChannelValues(sum_dy, 0.0), channels),
                        all_channels<double>(ChannelValues(sum_dy_xmu, 0.0), channels), count.item<double>()};
  return std::get<0>(backward(grad_output, input, weight, mean, invstd, true, {true, false, false}, &given));
}

void update_running_stats(Tensor& running_mean, Tensor& running_var, const std::optional<Tensor>& num_batches_tracked,
                          const Tensor& save_mean, const Tensor& save_invstd, double eps, int64_t count,
                          std::optional<double> momentum) {
  check_running_stats_args(running_mean, running_var, num_batches_tracked, save_mean, save_invstd, count, momentum);
  double factor = momentum.value_or(0.0);
  if (is_given(num_batches_tracked)) {
    int64_t& batches = *num_batches_tracked->mutable_data_ptr<int64_t>();
    batches += 1;
    if (!momentum.has_value()) {
      factor = 1.0 / static_cast<double>(batches);
    }
  }
  if (count == 0) {
    return;  // an empty batch has no statistics; nn.BatchNorm leaves the running stats as they were
  }
  const ChannelValues batch_mean(save_mean, 0.0);
  const ChannelValues batch_invstd(save_invstd, 1.0);
  const ChannelValues mean_values(running_mean, 0.0);
  const ChannelValues var_values(running_var, 1.0);
  const double unbiased = static_cast<double>(count) / static_cast<double>(count - 1);
  for_channel_blocks(save_mean.numel(), [&](int64_t c0, int64_t n) {
    double mean[kParamBlock], invstd[kParamBlock], new_mean[kParamBlock], new_var[kParamBlock];
    batch_mean.read(c0, n, mean);
    batch_invstd.read(c0, n, invstd);
    mean_values.read(c0, n, new_mean);
    var_values.read(c0, n, new_var);
    for (int64_t j = 0; j < n; ++j) {
      // The biased variance behind invstd, in float64; never negative after rounding.
      const double biased_var = std::max(0.0, 1.0 / (invstd[j] * invstd[j]) - eps);
      new_mean[j] = running_average(new_mean[j], mean[j], factor);
      new_var[j] = running_average(new_var[j], biased_var * unbiased, factor);
    }
    mean_values.write(c0, n, new_mean);
    var_values.write(c0, n, new_var);
  });
  mean_values.commit();
  var_values.commit();
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_eval", &batch_norm_eval);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("update_running_stats", &update_running_stats);
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt);
}

}  // namespace bnext::cpu
