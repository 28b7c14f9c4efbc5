// Operator schemas of torch.ops.bnext and the `bnext._C` Python module that loads them.
// Kernels live in one file per backend: cpu/ and cuda/; autograd/ has the eager twins' C++ autograd.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing bnext._C runs the static registrations below; the module itself is empty.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(bnext, m) {
  // Training forward: normalizes with the batch's statistics and returns them per channel
  // (float32 for float16/bfloat16 input) for backward and the running-stats update.
  m.def("batch_norm_train(Tensor input, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor output, Tensor save_mean, Tensor save_invstd)");
  // Eval forward: normalizes with running statistics.
  m.def("batch_norm_eval(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, "
        "Tensor? bias, float eps) -> Tensor");
  // Gradients of either forward. `mean` and `invstd` are the saved batch statistics when
  // training, the running mean and 1/sqrt(running_var + eps) otherwise. A gradient whose
  // output_mask entry is false comes back with shape [0].
  m.def("batch_norm_backward(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
        "bool training, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // In-place running-statistics update from a training forward's saved statistics over `count`
  // values per channel. Increments num_batches_tracked when given; momentum=None averages
  // cumulatively with factor 1/num_batches_tracked read on the tensor's own device.
  m.def("update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, "
        "Tensor save_mean, Tensor save_invstd, float eps, SymInt count, float? momentum) -> ()");
  // SyncBatchNorm's local passes. Per-channel mean and biased variance (the stats dtype), with
  // no normalize: the statistics that are merged across processes.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  // Training input gradient from per-channel sums over `count` values (one-element tensor) that
  // were reduced over every process: sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)).
  m.def("batch_norm_backward_elemt(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, Tensor invstd, "
        "Tensor sum_dy, Tensor sum_dy_xmu, Tensor count) -> Tensor");
  // Eager twins of the two forwards: same results, autograd in C++ rather than through
  // register_autograd's Python layer. bnext's Python API calls them outside torch.compile/export.
  m.def("batch_norm_train_eager(Tensor input, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor output, Tensor save_mean, Tensor save_invstd)");
  m.def("batch_norm_eval_eager(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, "
        "Tensor? bias, float eps) -> Tensor");
}
