// Memory layouts the kernels of every backend walk, and how an input maps to one.
//   planar: contiguous (N, C, *): each (n, c) is one run of `inner` values (NCHW, NCL, NCDHW);
//   rows:   channel fastest, (rows, C) in memory: channels_last, channels_last_3d, (N, C), and a
//           (N, C, L) view of an (N, L, C) tensor.
// Any other strided input is made contiguous first.
#pragma once

#include "batch_norm_checks.h"

#include <ATen/core/Tensor.h>

#include <utility>

namespace bnext {

struct Layout {
  bool rows;
  int64_t channels;
  int64_t batch;     // planar: N
  int64_t inner;     // planar: values per (n, c)
  int64_t num_rows;  // values per channel (rows: the number of rows)
};

// Channel fastest, then the other dims in order: (N, *, C) contiguous in memory.
inline bool is_rows_layout(const at::Tensor& t) {
  int64_t expected_stride = 1;
  const auto dense = [&](int64_t dim) {
    const bool ok = t.size(dim) == 1 || t.stride(dim) == expected_stride;
    expected_stride *= t.size(dim);
    return ok;
  };
  if (!dense(1)) {
    return false;
  }
  for (int64_t dim = t.dim() - 1; dim >= 2; --dim) {
    if (!dense(dim)) {
      return false;
    }
  }
  return dense(0);
}

// The tensor a kernel reads (input itself unless it is neither layout) and its layout.
inline std::pair<at::Tensor, Layout> kernel_view(const at::Tensor& input) {
  const at::Tensor x = is_rows_layout(input) || input.is_contiguous() ? input : input.contiguous();
  const int64_t channels = num_channels(x);
  const int64_t per_channel = values_per_channel(x);
  const bool rows = is_rows_layout(x);
  const int64_t batch = x.size(0);
  return {x, Layout{rows, channels, batch, batch == 0 ? 0 : per_channel / batch, per_channel}};
}

// `t` (grad_output) in the layout the kernels read their input in.
inline at::Tensor as_layout(const at::Tensor& t, const Layout& layout) {
  if (layout.rows) {
    return is_rows_layout(t) ? t : t.movedim(1, -1).contiguous().movedim(-1, 1);
  }
  return t.contiguous();
}

}  // namespace bnext
