// CUDA kernels of the torch.ops.bnext operators: the same schemas as the CPU backend, the same
// per-channel math (../batch_norm_math.h), argument checks and memory layouts.
//
// Reductions split each channel over many blocks, so that a layer with few channels and many
// values still fills the GPU: each block reduces a slice of one channel (planar) or a band of rows
// for 32 channels (rows), merging per-thread moments by warp shuffles and shared memory; a small
// kernel then merges the slices of each channel in order (Chan) and computes the per-channel
// coefficients the elementwise pass uses. Nothing reads a value back to the host.
// Everything before the elementwise pass is in float64: each thread's sums (of d = x - shift and
// d^2 for the statistics, shift being the thread's first value; of dy and dy * (x - mean) for the
// gradients) and every merge after them. A GPU's float64 adds are far faster than a memory-bound
// pass needs. In float, merging up to 1024 slices gave weight and bias gradients 2-10x torch's
// error on the H100, and per-thread float sums over 64 values still 2-3x.
#include "../batch_norm_checks.h"
#include "../batch_norm_layout.h"
#include "../batch_norm_math.h"

#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>

namespace bnext::cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kWarp = 32;
// Rows kernels: 32 channels across a warp (coalesced), kRowLanes rows per block in parallel.
constexpr int kRowLanes = kThreads / kWarp;
// Values of one channel per reduction block, and the most blocks one channel is split into.
constexpr int64_t kValuesPerBlock = 16384;
constexpr int64_t kMaxSplits = 1024;
// Grid of the elementwise passes (grid-stride loops).
constexpr int64_t kMaxElementwiseBlocks = 65535;

// Division by a fixed divisor without a divide instruction (Granlund and Montgomery's round-up
// magic number): exact for every 32-bit numerator, as an exhaustive host check of the formula
// over many divisors showed.
struct Divider {
  uint32_t divisor = 1;
  uint32_t magic = 1;
  uint32_t shift = 0;

  Divider() = default;
  explicit Divider(uint32_t d) : divisor(d) {
    while ((uint64_t(1) << shift) < d) {
      ++shift;
    }
    magic = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }
  __device__ uint32_t quotient(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(__umulhi(n, magic)) + n) >> shift);
  }
};

// A per-channel vector of any of the four floating dtypes, at any stride, read and written in
// float64 on the device; data is null for an absent optional argument. Per-channel arguments in
// the input's dtype (bfloat16 weights, say) thus need no conversion kernel before the real work.
struct ChannelVector {
  void* data = nullptr;
  int64_t stride = 1;
  at::ScalarType dtype = at::kFloat;

  template <typename T>
  __device__ T* element(int64_t c) const {
    return static_cast<T*>(data) + c * stride;
  }
  __device__ double get(int64_t c) const {
    switch (dtype) {
      case at::kDouble:
        return *element<double>(c);
      case at::kHalf:
        return static_cast<float>(*element<at::Half>(c));
      case at::kBFloat16:
        return static_cast<float>(*element<at::BFloat16>(c));
      default:
        return *element<float>(c);
    }
  }
  __device__ double get_or(int64_t c, double absent) const {
    return data ? get(c) : absent;
  }
  __device__ void set(int64_t c, double value) const {
    switch (dtype) {
      case at::kDouble:
        *element<double>(c) = value;
        break;
      case at::kHalf:
        *element<at::Half>(c) = static_cast<at::Half>(static_cast<float>(value));
        break;
      case at::kBFloat16:
        *element<at::BFloat16>(c) = static_cast<at::BFloat16>(static_cast<float>(value));
        break;
      default:
        *element<float>(c) = static_cast<float>(value);
    }
  }
};

bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

// `t`'s values as a vector the kernels read (and the running-stats update writes) in place: t
// itself where it is in one of the four dtypes and one-dimensional (any stride but 0) or
// contiguous; otherwise a float64 copy, which the update copies back (the returned tensor is then
// defined).
std::pair<ChannelVector, Tensor> channel_vector(const Tensor& t, int64_t channels) {
  if (is_kernel_dtype(t.scalar_type()) && (t.dim() <= 1 || t.is_contiguous())) {
    const Tensor flat = t.view({-1});
    if (flat.stride(0) != 0 || channels == 1) {
      return {{flat.data_ptr(), flat.stride(0), t.scalar_type()}, Tensor()};
    }
  }
  Tensor copy = t.reshape({channels}).to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  return {{copy.data_ptr(), 1, at::kDouble}, copy};
}

// An optional per-channel argument as a vector (null data where absent), and the tensor that holds
// its values where a copy was needed.
std::pair<ChannelVector, Tensor> optional_vector(const std::optional<Tensor>& t, int64_t channels) {
  if (!is_given(t)) {
    return {ChannelVector{}, Tensor()};
  }
  return channel_vector(*t, channels);
}

// Two per-channel sums: of dy, and of dy * (x - mean).
template <typename acc_t>
struct GradSums {
  acc_t dy = 0;
  acc_t dy_xmu = 0;
};

template <typename acc_t>
__device__ Moments<acc_t> combine(const Moments<acc_t>& a, const Moments<acc_t>& b) {
  return merge(a, b);
}

template <typename acc_t>
__device__ GradSums<acc_t> combine(const GradSums<acc_t>& a, const GradSums<acc_t>& b) {
  return {a.dy + b.dy, a.dy_xmu + b.dy_xmu};
}

// A thread's statistics: its count, the shift, and the sums of d = x - shift and of d^2.
struct ShiftedSums {
  double count = 0;
  double shift = 0;
  double sum = 0;
  double sum_sq = 0;
};

// A thread's state as the state the merges combine.
__device__ Moments<double> widen(const ShiftedSums& s) {
  if (s.count == 0) {
    return {};  // no values (a thread past the end of its slice): the merges skip it
  }
  return moments_from_shifted_sums(s.count, s.shift, s.sum, s.sum_sq);
}

__device__ GradSums<double> widen(const GradSums<double>& s) {
  return s;
}

template <typename State>
using Wide = decltype(widen(std::declval<State>()));

template <typename acc_t>
__device__ Moments<acc_t> shuffle_down(const Moments<acc_t>& m, int offset) {
  return {__shfl_down_sync(0xffffffff, m.count, offset), __shfl_down_sync(0xffffffff, m.mean, offset),
          __shfl_down_sync(0xffffffff, m.m2, offset)};
}

template <typename acc_t>
__device__ GradSums<acc_t> shuffle_down(const GradSums<acc_t>& s, int offset) {
  return {__shfl_down_sync(0xffffffff, s.dy, offset), __shfl_down_sync(0xffffffff, s.dy_xmu, offset)};
}

// Merge of every thread's state of a 1-D block of kThreads threads; the result is in thread 0.
template <typename State>
__device__ State block_combine(State state) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    state = combine(state, shuffle_down(state, offset));
  }
  __shared__ alignas(16) unsigned char storage[sizeof(State) * (kThreads / kWarp)];
  State* warp_states = reinterpret_cast<State*>(storage);
  const int warp = threadIdx.x / kWarp;
  if (threadIdx.x % kWarp == 0) {
    warp_states[warp] = state;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads / kWarp; ++w) {
      state = combine(state, warp_states[w]);
    }
  }
  return state;
}

// Merge over threadIdx.y of a (kWarp, kRowLanes) block; the result is in the threads with y = 0.
template <typename State>
__device__ State column_combine(State state) {
  __shared__ alignas(16) unsigned char storage[sizeof(State) * kThreads];
  State* states = reinterpret_cast<State*>(storage);
  states[threadIdx.y * kWarp + threadIdx.x] = state;
  __syncthreads();
  if (threadIdx.y == 0) {
    for (int y = 1; y < kRowLanes; ++y) {
      state = combine(state, states[y * kWarp + threadIdx.x]);
    }
  }
  return state;
}

// The slice [begin, end) of `total` values that split `split` of `splits` reduces.
struct Slice {
  int64_t begin;
  int64_t end;
};

__device__ Slice slice_of(int64_t total, int64_t split, int64_t splits) {
  const int64_t size = (total + splits - 1) / splits;
  return {split * size, std::min(total, (split + 1) * size)};
}

// What a thread sums, in float64: `load` reads one element (as stored), `add` adds it to the
// thread's state. The loops issue several loads before the first add, so that each thread keeps
// several reads in flight. The statistics' shift is the thread's own first value: within
// sqrt(count) standard deviations of its values' mean, so the sums of d and d^2 lose nothing to
// cancellation whatever the channel's other values. (With the channel's first value as every
// thread's shift, a numpy model of 64 float32 values lost 7e-5 of the variance when that value was
// 1e6 standard deviations off.)
template <typename scalar_t, typename acc_t>
struct MomentsOf {
  using Value = scalar_t;
  const scalar_t* x;
  __device__ Value load(int64_t index) const {
    return x[index];
  }
  __device__ void add(ShiftedSums& state, Value loaded, int64_t) const {
    const double value = static_cast<double>(static_cast<acc_t>(loaded));
    if (state.count == 0) {
      state.shift = value;
    }
    const double d = value - state.shift;
    state.count += 1;
    state.sum += d;
    state.sum_sq += d * d;
  }
};

template <typename scalar_t, typename acc_t>
struct GradSumsOf {
  struct Value {
    scalar_t dy;
    scalar_t x;
  };
  const scalar_t* dy;
  const scalar_t* x;
  const acc_t* mean;
  __device__ Value load(int64_t index) const {
    return {dy[index], x[index]};
  }
  __device__ void add(GradSums<double>& state, Value loaded, int64_t c) const {
    const double g = static_cast<double>(static_cast<acc_t>(loaded.dy));
    state.dy += g;
    state.dy_xmu += g * (static_cast<double>(static_cast<acc_t>(loaded.x)) - static_cast<double>(mean[c]));
  }
};

// Loads each thread issues before adding: 32 bytes of each tensor read, at least 8 loads. (4 loads
// of float32 kept an H100's DRAM 43% busy on a 64x64x56x56 NCHW tensor, by Nsight Compute.)
template <typename Source>
constexpr int kLoadsInFlight = std::max<int>(8, 32 / static_cast<int>(sizeof(typename Source::Value)));

// source.add(state, value at index_of(k)) for k = first, first + stride, ... < end, in that order.
template <typename Source, typename State, typename IndexOf>
__device__ void add_strided(const Source& source, State& state, int64_t c, int64_t first, int64_t end,
                            int64_t stride, IndexOf index_of) {
  constexpr int kBatch = kLoadsInFlight<Source>;
  int64_t k = first;
  for (; k + (kBatch - 1) * stride < end; k += kBatch * stride) {
    typename Source::Value values[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      values[u] = source.load(index_of(k + u * stride));
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      source.add(state, values[u], c);
    }
  }
  for (; k < end; k += stride) {
    source.add(state, source.load(index_of(k)), c);
  }
}

// Planar: block (c, split) reduces a slice of channel c's batch * inner values. The image of a
// value comes from `by_inner` (a multiplication) where a channel has under 2^32 values.
template <typename State, typename Source>
__global__ void planar_partials(Source source, int64_t channels, int64_t inner, Divider by_inner,
                                int64_t per_channel, int64_t splits, Wide<State>* partials) {
  const int64_t c = blockIdx.x;
  const int64_t split = blockIdx.y;
  const Slice slice = slice_of(per_channel, split, splits);
  const bool small = per_channel <= std::numeric_limits<uint32_t>::max();
  State state{};
  add_strided(source, state, c, slice.begin + threadIdx.x, slice.end, kThreads, [&](int64_t k) {
    const int64_t n = small ? static_cast<int64_t>(by_inner.quotient(static_cast<uint32_t>(k))) : k / inner;
    return (n * channels + c) * inner + (k - n * inner);
  });
  const Wide<State> merged = block_combine(widen(state));
  if (threadIdx.x == 0) {
    partials[c * splits + split] = merged;
  }
}

// Rows: block (channel group, split) reduces a band of rows for kWarp channels.
template <typename State, typename Source>
__global__ void rows_partials(Source source, int64_t channels, int64_t num_rows, int64_t splits,
                              Wide<State>* partials) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const int64_t split = blockIdx.y;
  const Slice slice = slice_of(num_rows, split, splits);
  State state{};
  if (c < channels) {
    add_strided(source, state, c, slice.begin + threadIdx.y, slice.end, kRowLanes,
                [&](int64_t r) { return r * channels + c; });
  }
  const Wide<State> merged = column_combine(widen(state));
  if (threadIdx.y == 0 && c < channels) {
    partials[c * splits + split] = merged;
  }
}

// How many blocks each channel's reduction is split into: a function of the shape only, so
// results do not depend on the device. A rows block covers kWarp channels, so fewer rows.
int64_t num_splits(const Layout& layout) {
  const int64_t values_per_block = layout.rows ? kValuesPerBlock / kWarp : kValuesPerBlock;
  return std::clamp<int64_t>((layout.num_rows + values_per_block - 1) / values_per_block, 1, kMaxSplits);
}

// Per-channel partial states of `source` over the whole tensor, in float64: [channels][splits].
template <typename State, typename Source>
void launch_partials(const Layout& layout, const Source& source, int64_t splits, Wide<State>* partials,
                     cudaStream_t stream) {
  if (layout.rows) {
    const dim3 grid((layout.channels + kWarp - 1) / kWarp, splits);
    rows_partials<State><<<grid, dim3(kWarp, kRowLanes), 0, stream>>>(source, layout.channels, layout.num_rows,
                                                                         splits, partials);
  } else {
    TORCH_CHECK(layout.channels <= std::numeric_limits<int32_t>::max(), "bnext batch_norm (CUDA): ",
                layout.channels, " channels is more than a grid holds");
    const dim3 grid(layout.channels, splits);  // channels on x: up to 2^31 - 1 of them
    const bool small = layout.num_rows <= std::numeric_limits<uint32_t>::max();  // then inner is too
    const Divider by_inner = small ? Divider(static_cast<uint32_t>(layout.inner)) : Divider();
    planar_partials<State><<<grid, kThreads, 0, stream>>>(source, layout.channels, layout.inner, by_inner,
                                                          layout.num_rows, splits, partials);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The finishing kernels give each channel one warp (kChannelsPerBlock channels per block): lane l
// merges splits l, l + kWarp, ... in order, then the lanes' states merge in a fixed tree, so that
// up to kMaxSplits partials take a few dozen merges in a row rather than a thousand. The order is a
// function of the shape only. The merged state is in lane 0; every lane of the channel's warp
// calls this (a warp past the last channel returns before).
constexpr int kChannelsPerBlock = kThreads / kWarp;

int64_t warp_channel_blocks(int64_t channels) {
  return std::max<int64_t>(1, (channels + kChannelsPerBlock - 1) / kChannelsPerBlock);
}

__device__ int64_t warp_channel() {
  return static_cast<int64_t>(blockIdx.x) * kChannelsPerBlock + threadIdx.x / kWarp;
}

template <typename State>
__device__ State warp_merged(const State* partials, int64_t c, int64_t splits) {
  State state{};
  for (int64_t split = threadIdx.x % kWarp; split < splits; split += kWarp) {
    state = combine(state, partials[c * splits + split]);
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    state = combine(state, shuffle_down(state, offset));
  }
  return state;
}

// Per-channel mean and biased variance from the partial moments (no normalize).
template <typename acc_t>
__global__ void finish_stats(const Moments<double>* partials, int64_t channels, int64_t splits, acc_t* mean,
                             acc_t* var) {
  const int64_t c = warp_channel();
  if (c >= channels) {
    return;
  }
  const Moments<double> moments = warp_merged(partials, c, splits);
  if (threadIdx.x % kWarp == 0) {
    mean[c] = static_cast<acc_t>(moments.mean);
    var[c] = static_cast<acc_t>(moments.m2 / moments.count);
  }
}

// Merges each channel's partial moments; writes the saved statistics and the normalize
// coefficients [center | scale | shift].
template <typename acc_t>
__global__ void finish_moments(const Moments<double>* partials, int64_t channels, int64_t splits, double eps,
                               ChannelVector weight, ChannelVector bias, acc_t* save_mean, acc_t* save_invstd,
                               acc_t* affine) {
  const int64_t c = warp_channel();
  if (c >= channels) {
    return;
  }
  const Moments<double> moments = warp_merged(partials, c, splits);
  if (threadIdx.x % kWarp != 0) {
    return;
  }
  const acc_t mean = static_cast<acc_t>(moments.mean);
  const acc_t invstd = static_cast<acc_t>(inverse_std(moments.m2 / moments.count, eps));
  save_mean[c] = mean;
  save_invstd[c] = invstd;
  const Affine<acc_t> a = normalize_affine<acc_t>(mean, invstd, static_cast<acc_t>(weight.get_or(c, 1)),
                                                  static_cast<acc_t>(bias.get_or(c, 0)));
  affine[c] = a.center;
  affine[channels + c] = a.scale;
  affine[2 * channels + c] = a.shift;
}

// Normalize coefficients from running statistics (eval).
template <typename acc_t>
__global__ void running_affine(ChannelVector running_mean, ChannelVector running_var, int64_t channels, acc_t eps,
                               ChannelVector weight, ChannelVector bias, acc_t* affine) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) {
    return;
  }
  const Affine<acc_t> a = normalize_affine<acc_t>(
      static_cast<acc_t>(running_mean.get(c)), inverse_std(static_cast<acc_t>(running_var.get(c)), eps),
      static_cast<acc_t>(weight.get_or(c, 1)), static_cast<acc_t>(bias.get_or(c, 0)));
  affine[c] = a.center;
  affine[channels + c] = a.scale;
  affine[2 * channels + c] = a.shift;
}

// Merges each channel's gradient sums; writes grad_weight, grad_bias and the input-gradient
// coefficients [dy_scale | xmu_scale | shift | mean].
template <typename acc_t>
__global__ void finish_grad_sums(const GradSums<double>* partials, int64_t channels, int64_t splits, acc_t count,
                                 bool training, ChannelVector weight, const acc_t* mean, const acc_t* invstd,
                                 ChannelVector grad_weight, ChannelVector grad_bias, acc_t* coefficients) {
  const int64_t c = warp_channel();
  if (c >= channels) {
    return;
  }
  const GradSums<double> sums = warp_merged(partials, c, splits);
  if (threadIdx.x % kWarp != 0) {
    return;
  }
  const acc_t sum_dy = static_cast<acc_t>(sums.dy);
  const acc_t sum_dy_xmu = static_cast<acc_t>(sums.dy_xmu);
  if (grad_weight.data) {  // rounded to acc_t first, as the gradient in acc_t converted to its dtype
    grad_weight.set(c, static_cast<acc_t>(sums.dy_xmu * static_cast<double>(invstd[c])));
  }
  if (grad_bias.data) {
    grad_bias.set(c, sum_dy);
  }
  const InputGradient<acc_t> g = input_gradient(invstd[c], static_cast<acc_t>(weight.get_or(c, 1)), sum_dy,
                                                sum_dy_xmu, count, training);
  coefficients[c] = g.dy_scale;
  coefficients[channels + c] = g.xmu_scale;
  coefficients[2 * channels + c] = g.shift;
  coefficients[3 * channels + c] = mean[c];
}

// Input-gradient coefficients from sums reduced over every process and their count (on the device).
template <typename acc_t>
__global__ void given_sums_coefficients(const acc_t* sum_dy, const acc_t* sum_dy_xmu, const acc_t* count,
                                        int64_t channels, ChannelVector weight, const acc_t* mean,
                                        const acc_t* invstd, acc_t* coefficients) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) {
    return;
  }
  const InputGradient<acc_t> g =
      input_gradient(invstd[c], static_cast<acc_t>(weight.get_or(c, 1)), sum_dy[c], sum_dy_xmu[c], *count, true);
  coefficients[c] = g.dy_scale;
  coefficients[channels + c] = g.xmu_scale;
  coefficients[2 * channels + c] = g.shift;
  coefficients[3 * channels + c] = mean[c];
}

// The elementwise passes read and write packs of V values: 16 bytes (V = 16 / sizeof(scalar_t))
// where the layout allows, else single values (V = 1).
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t values[V];
};

template <typename scalar_t>
constexpr int kPackWidth = 16 / static_cast<int>(sizeof(scalar_t));

// The channel of the first value of pack p. Planar packs lie inside one plane, so all their values
// have that channel; rows packs hold V consecutive channels. Pack indices under 2^32 divide by
// multiplication, larger ones in 64 bits.
struct PackChannels {
  bool rows = false;
  int64_t width = 1;          // V
  int64_t channels = 1;
  int64_t inner_packs = 1;    // planar: packs per plane
  int64_t channel_packs = 1;  // rows: packs per row
  bool small = false;         // every pack index fits in 32 bits
  Divider by_inner;
  Divider by_channels;
  Divider by_channel_packs;

  __device__ int64_t first_channel(int64_t p) const {
    if (rows) {
      if (small) {
        const uint32_t n = static_cast<uint32_t>(p);
        return static_cast<int64_t>(n - by_channel_packs.quotient(n) * by_channel_packs.divisor) * width;
      }
      return (p % channel_packs) * width;
    }
    if (small) {
      const uint32_t plane = by_inner.quotient(static_cast<uint32_t>(p));
      return static_cast<int64_t>(plane - by_channels.quotient(plane) * by_channels.divisor);
    }
    return (p / inner_packs) % channels;
  }
};

// How a tensor of `layout` is walked in packs of `width` values; `width` must divide the plane
// (planar) or the channel count (rows).
PackChannels pack_channels(const Layout& layout, int64_t numel, int64_t width) {
  PackChannels where;
  where.rows = layout.rows;
  where.width = width;
  where.channels = layout.channels;
  where.inner_packs = layout.rows ? 1 : layout.inner / width;
  where.channel_packs = layout.rows ? layout.channels / width : 1;
  where.small = numel / width <= std::numeric_limits<uint32_t>::max();
  if (where.small && layout.rows) {  // every pack index fits in 32 bits, so every divisor does
    where.by_channel_packs = Divider(static_cast<uint32_t>(where.channel_packs));
  } else if (where.small) {
    where.by_inner = Divider(static_cast<uint32_t>(where.inner_packs));
    where.by_channels = Divider(static_cast<uint32_t>(layout.channels));
  }
  return where;
}

// The per-channel coefficients of pack p's values: planar packs lie in one channel (one value per
// coefficient, used for all V values), rows packs span V consecutive channels (V values, read as
// one aligned pack: the buffers hold `channels` values each, a multiple of V, from 256-byte
// aligned allocations).
template <bool kRows, int V, typename acc_t>
struct Coefficients {
  acc_t values[kRows ? V : 1];
  __device__ Coefficients(const acc_t* buffer, int64_t first) {
    if constexpr (kRows) {
      *reinterpret_cast<Pack<acc_t, V>*>(values) = *reinterpret_cast<const Pack<acc_t, V>*>(buffer + first);
    } else {
      values[0] = buffer[first];
    }
  }
  __device__ acc_t operator[](int i) const {
    return values[kRows ? i : 0];
  }
};

// y = (x - center) * scale + shift, pack by pack, with affine = [center | scale | shift].
template <bool kRows, int V, typename scalar_t, typename acc_t>
__global__ void normalize(const scalar_t* x, scalar_t* y, int64_t num_packs, PackChannels where,
                          const acc_t* affine) {
  using P = Pack<scalar_t, V>;
  const int64_t channels = where.channels;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < num_packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = where.first_channel(p);
    const P in = reinterpret_cast<const P*>(x)[p];
    const Coefficients<kRows, V, acc_t> center(affine, first);
    const Coefficients<kRows, V, acc_t> scale(affine + channels, first);
    const Coefficients<kRows, V, acc_t> shift(affine + 2 * channels, first);
    P out;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      out.values[i] = static_cast<scalar_t>((static_cast<acc_t>(in.values[i]) - center[i]) * scale[i] + shift[i]);
    }
    reinterpret_cast<P*>(y)[p] = out;
  }
}

// dx = dy * dy_scale + (x - mean) * xmu_scale + shift, pack by pack, with coefficients =
// [dy_scale | xmu_scale | shift | mean]. Eval (running statistics are constants) is
// dx = dy * dy_scale and never reads x, so a non-finite x cannot leak.
template <bool kTraining, bool kRows, int V, typename scalar_t, typename acc_t>
__global__ void input_grad(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t num_packs,
                           PackChannels where, const acc_t* coefficients) {
  using P = Pack<scalar_t, V>;
  const int64_t channels = where.channels;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < num_packs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t first = where.first_channel(p);
    const P grad = reinterpret_cast<const P*>(dy)[p];
    const Coefficients<kRows, V, acc_t> dy_scale(coefficients, first);
    P out;
    if constexpr (kTraining) {
      const P in = reinterpret_cast<const P*>(x)[p];
      const Coefficients<kRows, V, acc_t> xmu_scale(coefficients + channels, first);
      const Coefficients<kRows, V, acc_t> shift(coefficients + 2 * channels, first);
      const Coefficients<kRows, V, acc_t> mean(coefficients + 3 * channels, first);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const acc_t xmu = static_cast<acc_t>(in.values[i]) - mean[i];
        out.values[i] = static_cast<scalar_t>(static_cast<acc_t>(grad.values[i]) * dy_scale[i] +
                                              (xmu * xmu_scale[i] + shift[i]));
      }
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) {
        out.values[i] = static_cast<scalar_t>(static_cast<acc_t>(grad.values[i]) * dy_scale[i]);
      }
    }
    reinterpret_cast<P*>(dx)[p] = out;
  }
}

// The pack width for these tensors: 16 bytes where the plane (planar) or the channel count (rows)
// is a multiple of it and every pointer is 16-byte aligned, else 1.
template <typename scalar_t>
int64_t pack_width(const Layout& layout, std::initializer_list<const void*> pointers) {
  constexpr int64_t width = kPackWidth<scalar_t>;
  const bool divides = layout.rows ? layout.channels % width == 0 : layout.inner % width == 0;
  const bool aligned = std::all_of(pointers.begin(), pointers.end(), [](const void* pointer) {
    return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
  });
  return divides && aligned ? width : 1;
}

int64_t elementwise_blocks(int64_t numel) {
  return std::clamp<int64_t>((numel + kThreads - 1) / kThreads, 1, kMaxElementwiseBlocks);
}

int64_t channel_blocks(int64_t channels) {
  return std::max<int64_t>(1, (channels + kThreads - 1) / kThreads);
}

at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel tensor as a contiguous tensor of the accumulation type, on the device (no sync).
Tensor channel_values(const std::optional<Tensor>& t, int64_t channels, at::ScalarType dtype) {
  if (!is_given(t)) {
    return Tensor();
  }
  return t->reshape({channels}).to(dtype).contiguous();
}

// The normalize kernel for a layout's kind and a pack width.
template <bool kRows, typename scalar_t, typename acc_t>
auto normalize_kernel(int64_t width) {
  return width == 1 ? normalize<kRows, 1, scalar_t, acc_t> : normalize<kRows, kPackWidth<scalar_t>, scalar_t, acc_t>;
}

// y = (x - center) * scale + shift with the per-channel [center | scale | shift] in `affine`.
template <typename scalar_t, typename acc_t>
void launch_normalize(const Tensor& x, Tensor& output, const Layout& layout, const Tensor& affine,
                      cudaStream_t stream) {
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  const int64_t width = pack_width<scalar_t>(layout, {in, out});
  const int64_t num_packs = x.numel() / width;
  const PackChannels where = pack_channels(layout, x.numel(), width);
  const auto kernel = layout.rows ? normalize_kernel<true, scalar_t, acc_t>(width)
                                  : normalize_kernel<false, scalar_t, acc_t>(width);
  kernel<<<elementwise_blocks(num_packs), kThreads, 0, stream>>>(in, out, num_packs, where,
                                                                 affine.const_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The input-gradient kernel for a mode, a layout's kind and a pack width.
template <bool kTraining, bool kRows, typename scalar_t, typename acc_t>
auto input_grad_kernel(int64_t width) {
  return width == 1 ? input_grad<kTraining, kRows, 1, scalar_t, acc_t>
                    : input_grad<kTraining, kRows, kPackWidth<scalar_t>, scalar_t, acc_t>;
}

// dx from dy (and x, in training) with the per-channel [dy_scale | xmu_scale | shift | mean]
// coefficients. Eval reads no x, so only dy and dx decide the pack width there.
template <typename scalar_t, typename acc_t>
void launch_input_grad(const Tensor& dy, const Tensor& x, Tensor& dx, const Layout& layout, bool training,
                       const Tensor& coefficients, cudaStream_t stream) {
  const scalar_t* grad = dy.const_data_ptr<scalar_t>();
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  const int64_t width = training ? pack_width<scalar_t>(layout, {grad, in, out}) : pack_width<scalar_t>(layout, {grad, out});
  const int64_t num_packs = x.numel() / width;
  const PackChannels where = pack_channels(layout, x.numel(), width);
  const auto kernel = training ? (layout.rows ? input_grad_kernel<true, true, scalar_t, acc_t>(width)
                                              : input_grad_kernel<true, false, scalar_t, acc_t>(width))
                               : (layout.rows ? input_grad_kernel<false, true, scalar_t, acc_t>(width)
                                              : input_grad_kernel<false, false, scalar_t, acc_t>(width));
  kernel<<<elementwise_blocks(num_packs), kThreads, 0, stream>>>(grad, in, out, num_packs, where,
                                                                 coefficients.const_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_cuda(const Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "bnext batch_norm (CUDA): input must be a CUDA tensor, got ", input.device());
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_train(const Tensor& input, const std::optional<Tensor>& weight,
                                                    const std::optional<Tensor>& bias, double eps) {
  check_train_args(input, weight, bias, eps);  // first: a CPU input beside CUDA weights is a device mismatch
  check_cuda(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto [x, layout] = kernel_view(input);
  const auto stats_dtype = acc_dtype(input.scalar_type());
  Tensor output = at::empty_like(x);
  Tensor save_mean = at::empty({layout.channels}, input.options().dtype(stats_dtype));
  Tensor save_invstd = at::empty({layout.channels}, input.options().dtype(stats_dtype));
  if (layout.num_rows == 0) {
    save_mean.zero_();
    save_invstd.zero_();
    return {output, save_mean, save_invstd};
  }
  const auto [weight_vector, weight_copy] = optional_vector(weight, layout.channels);
  const auto [bias_vector, bias_copy] = optional_vector(bias, layout.channels);
  const int64_t splits = num_splits(layout);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_batch_norm_train_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    Tensor partials = at::empty({layout.channels * splits * 3}, input.options().dtype(at::kDouble));
    Tensor affine = at::empty({3 * layout.channels}, input.options().dtype(stats_dtype));
    auto* moments = reinterpret_cast<Moments<double>*>(partials.mutable_data_ptr<double>());
    const MomentsOf<scalar_t, acc_t> source{x.const_data_ptr<scalar_t>()};
    launch_partials<ShiftedSums>(layout, source, splits, moments, stream);
    finish_moments<acc_t><<<warp_channel_blocks(layout.channels), kThreads, 0, stream>>>(
        moments, layout.channels, splits, eps, weight_vector, bias_vector, save_mean.mutable_data_ptr<acc_t>(),
        save_invstd.mutable_data_ptr<acc_t>(),
        affine.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_normalize<scalar_t, acc_t>(x, output, layout, affine, stream);
  });
  return {output, save_mean, save_invstd};
}

std::tuple<Tensor, Tensor> batch_norm_stats(const Tensor& input) {
  check_input(input);
  check_cuda(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto [x, layout] = kernel_view(input);
  const auto stats_dtype = acc_dtype(input.scalar_type());
  Tensor mean = at::zeros({layout.channels}, input.options().dtype(stats_dtype));
  Tensor var = at::zeros({layout.channels}, input.options().dtype(stats_dtype));
  if (layout.num_rows == 0) {
    return {mean, var};  // no values: count 0, which the merge across processes weighs by
  }
  const int64_t splits = num_splits(layout);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_batch_norm_stats_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    Tensor partials = at::empty({layout.channels * splits * 3}, input.options().dtype(at::kDouble));
    auto* moments = reinterpret_cast<Moments<double>*>(partials.mutable_data_ptr<double>());
    const MomentsOf<scalar_t, acc_t> source{x.const_data_ptr<scalar_t>()};
    launch_partials<ShiftedSums>(layout, source, splits, moments, stream);
    finish_stats<acc_t><<<warp_channel_blocks(layout.channels), kThreads, 0, stream>>>(
        moments, layout.channels, splits, mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

Tensor batch_norm_eval(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                       const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
  check_eval_args(input, running_mean, running_var, weight, bias, eps);
  check_cuda(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto [x, layout] = kernel_view(input);
  Tensor output = at::empty_like(x);
  if (x.numel() == 0) {
    return output;
  }
  const auto stats_dtype = acc_dtype(input.scalar_type());
  const auto [mean_vector, mean_copy] = channel_vector(running_mean, layout.channels);
  const auto [var_vector, var_copy] = channel_vector(running_var, layout.channels);
  const auto [weight_vector, weight_copy] = optional_vector(weight, layout.channels);
  const auto [bias_vector, bias_copy] = optional_vector(bias, layout.channels);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_batch_norm_eval_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    Tensor affine = at::empty({3 * layout.channels}, input.options().dtype(stats_dtype));
    running_affine<acc_t><<<channel_blocks(layout.channels), kThreads, 0, stream>>>(
        mean_vector, var_vector, layout.channels, static_cast<acc_t>(eps), weight_vector, bias_vector,
        affine.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_normalize<scalar_t, acc_t>(x, output, layout, affine, stream);
  });
  return output;
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward(const Tensor& grad_output, const Tensor& input,
                                                       const std::optional<Tensor>& weight, const Tensor& mean,
                                                       const Tensor& invstd, bool training,
                                                       std::array<bool, 3> output_mask) {
  check_backward_args(grad_output, input, weight, mean, invstd);
  check_cuda(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto [x, layout] = kernel_view(input);
  const Tensor dy = as_layout(grad_output, layout);
  const bool has_weight = is_given(weight);
  const auto param_options = has_weight ? weight->options() : input.options();
  const auto stats_dtype = acc_dtype(input.scalar_type());
  Tensor grad_input = output_mask[0] ? at::empty_like(x) : at::empty({0}, input.options());
  // The parameter gradients, written by the kernel in the parameters' dtype (or in stats_dtype and
  // converted after, for a dtype the kernel does not write).
  const auto param_dtype = c10::typeMetaToScalarType(param_options.dtype());
  const bool direct = is_kernel_dtype(param_dtype);
  const auto grad_options = direct ? param_options : param_options.dtype(stats_dtype);
  const auto parameter_gradient = [&](bool wanted) {
    if (!wanted) {
      return at::empty({0}, param_options);
    }
    return x.numel() > 0 ? at::empty({layout.channels}, grad_options) : at::zeros({layout.channels}, grad_options);
  };
  Tensor grad_weight = parameter_gradient(output_mask[1]);
  Tensor grad_bias = parameter_gradient(output_mask[2]);
  const auto output_vector = [&](const Tensor& gradient, bool wanted) {
    return wanted ? ChannelVector{gradient.data_ptr(), 1, gradient.scalar_type()} : ChannelVector{};
  };

  if (x.numel() > 0) {
    const auto [weight_vector, weight_copy] = optional_vector(weight, layout.channels);
    const Tensor mean_values = channel_values(mean, layout.channels, stats_dtype);
    const Tensor invstd_values = channel_values(invstd, layout.channels, stats_dtype);
    const int64_t splits = num_splits(layout);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_batch_norm_backward_cuda", [&] {
      using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
      Tensor partials = at::empty({layout.channels * splits * 2}, input.options().dtype(at::kDouble));
      Tensor coefficients = at::empty({4 * layout.channels}, input.options().dtype(stats_dtype));
      auto* sums = reinterpret_cast<GradSums<double>*>(partials.mutable_data_ptr<double>());
      const GradSumsOf<scalar_t, acc_t> source{dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                               mean_values.const_data_ptr<acc_t>()};
      launch_partials<GradSums<double>>(layout, source, splits, sums, stream);
      finish_grad_sums<acc_t><<<warp_channel_blocks(layout.channels), kThreads, 0, stream>>>(
          sums, layout.channels, splits, static_cast<acc_t>(layout.num_rows), training,
          weight_vector, mean_values.const_data_ptr<acc_t>(), invstd_values.const_data_ptr<acc_t>(),
          output_vector(grad_weight, output_mask[1]), output_vector(grad_bias, output_mask[2]),
          coefficients.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (output_mask[0]) {
        launch_input_grad<scalar_t, acc_t>(dy, x, grad_input, layout, training, coefficients, stream);
      }
    });
  }
  if (!direct) {
    grad_weight = grad_weight.to(param_dtype);
    grad_bias = grad_bias.to(param_dtype);
  }
  return {grad_input, grad_weight, grad_bias};
}

Tensor batch_norm_backward_elemt(const Tensor& grad_output, const Tensor& input, const std::optional<Tensor>& weight,
                                 const Tensor& mean, const Tensor& invstd, const Tensor& sum_dy,
                                 const Tensor& sum_dy_xmu, const Tensor& count) {
  check_backward_elemt_args(grad_output, input, weight, mean, invstd, sum_dy, sum_dy_xmu, count);
  check_cuda(input);
  const c10::cuda::CUDAGuard guard(input.device());
  const auto [x, layout] = kernel_view(input);
  const Tensor dy = as_layout(grad_output, layout);
  Tensor grad_input = at::empty_like(x);
  if (x.numel() == 0) {
    return grad_input;
  }
  const auto stats_dtype = acc_dtype(input.scalar_type());
  const int64_t channels = layout.channels;
  const auto [weight_vector, weight_copy] = optional_vector(weight, channels);
  const Tensor mean_values = channel_values(mean, channels, stats_dtype);
  const Tensor invstd_values = channel_values(invstd, channels, stats_dtype);
  const Tensor sum_dy_values = channel_values(sum_dy, channels, stats_dtype);
  const Tensor sum_dy_xmu_values = channel_values(sum_dy_xmu, channels, stats_dtype);
  const Tensor count_value = channel_values(count, 1, stats_dtype);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnext_batch_norm_backward_elemt_cuda",
                                  [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    Tensor coefficients = at::empty({4 * channels}, input.options().dtype(stats_dtype));
    given_sums_coefficients<acc_t><<<channel_blocks(channels), kThreads, 0, stream>>>(
        sum_dy_values.const_data_ptr<acc_t>(), sum_dy_xmu_values.const_data_ptr<acc_t>(),
        count_value.const_data_ptr<acc_t>(), channels, weight_vector,
        mean_values.const_data_ptr<acc_t>(), invstd_values.const_data_ptr<acc_t>(),
        coefficients.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_input_grad<scalar_t, acc_t>(dy, x, grad_input, layout, /*training=*/true, coefficients, stream);
  });
  return grad_input;
}

__global__ void increment_counter(int64_t* num_batches_tracked) {
  *num_batches_tracked += 1;
}

// Threads of the running-stats update; up to kUpdateSpan channels take one block, which then also
// increments the counter (every thread has read it by the barrier before).
constexpr int kUpdateThreads = 1024;
constexpr int64_t kUpdateSpan = 16 * kUpdateThreads;

// running = (1 - factor) * running + factor * batch, in float64, with factor = momentum or, for
// momentum=None, 1 / (num_batches_tracked + 1), the counter as it is before this call increments it.
__global__ void update_running(ChannelVector running_mean, ChannelVector running_var, int64_t* num_batches_tracked,
                               bool increment, ChannelVector save_mean, ChannelVector save_invstd, int64_t channels,
                               double eps, double unbiased, double momentum, bool cumulative) {
  const double factor = cumulative ? 1.0 / static_cast<double>(*num_batches_tracked + 1) : momentum;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; c < channels;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const double invstd = save_invstd.get(c);
    // The biased variance behind invstd; never negative after rounding.
    const double biased_var = fmax(0.0, 1.0 / (invstd * invstd) - eps);
    running_mean.set(c, running_average(running_mean.get(c), save_mean.get(c), factor));
    running_var.set(c, running_average(running_var.get(c), biased_var * unbiased, factor));
  }
  if (increment) {  // one block: every thread has read the counter before thread 0 writes it
    __syncthreads();
    if (threadIdx.x == 0) {
      *num_batches_tracked += 1;
    }
  }
}

void update_running_stats(Tensor& running_mean, Tensor& running_var, const std::optional<Tensor>& num_batches_tracked,
                          const Tensor& save_mean, const Tensor& save_invstd, double eps, int64_t count,
                          std::optional<double> momentum) {
  check_running_stats_args(running_mean, running_var, num_batches_tracked, save_mean, save_invstd, count, momentum);
  TORCH_CHECK(save_mean.is_cuda(), "bnext update_running_stats (CUDA): save_mean must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(save_mean.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool has_counter = is_given(num_batches_tracked);
  int64_t* counter = has_counter ? num_batches_tracked->mutable_data_ptr<int64_t>() : nullptr;
  const int64_t channels = save_mean.numel();
  if (count == 0 || channels == 0) {
    // an empty batch has no statistics; nn.BatchNorm leaves the running stats as they were
    if (has_counter) {
      increment_counter<<<1, 1, 0, stream>>>(counter);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return;
  }
  // Each buffer is rounded once, when the float64 result is stored; inputs in other dtypes or
  // layouts go through float64 copies.
  const auto [mean_vector, mean_copy] = channel_vector(running_mean, channels);
  const auto [var_vector, var_copy] = channel_vector(running_var, channels);
  const auto [save_mean_vector, save_mean_copy] = channel_vector(save_mean, channels);
  const auto [save_invstd_vector, save_invstd_copy] = channel_vector(save_invstd, channels);
  const bool one_block = channels <= kUpdateSpan;
  const int64_t blocks = one_block ? 1 : std::min<int64_t>((channels + kUpdateThreads - 1) / kUpdateThreads, 65535);
  update_running<<<blocks, kUpdateThreads, 0, stream>>>(
      mean_vector, var_vector, counter, has_counter && one_block, save_mean_vector, save_invstd_vector, channels, eps,
      static_cast<double>(count) / static_cast<double>(count - 1), momentum.value_or(0.0), !momentum.has_value());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (has_counter && !one_block) {  // after every block has read the counter
    increment_counter<<<1, 1, 0, stream>>>(counter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (mean_copy.defined()) {
    running_mean.copy_(mean_copy.view(running_mean.sizes()));
  }
  if (var_copy.defined()) {
    running_var.copy_(var_copy.view(running_var.sizes()));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(bnext, CUDA, m) {
  m.impl("batch_norm_train", &batch_norm_train);
  m.impl("batch_norm_eval", &batch_norm_eval);
  m.impl("batch_norm_backward", &batch_norm_backward);
  m.impl("update_running_stats", &update_running_stats);
  m.impl("batch_norm_stats", &batch_norm_stats);
  m.impl("batch_norm_backward_elemt", &batch_norm_backward_elemt);
}

}  // namespace bnext::cuda
