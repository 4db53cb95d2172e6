// Schemas of every op in plr_kernels._C, and the Python module init.
//
// The ops are reached through torch.ops.plr_kernels.<op>; kernels register
// per dispatch key in their own files (TORCH_LIBRARY_IMPL(plr_kernels, CPU /
// CUDA, m)). Python code that adds ops to this namespace must use
// torch.library.custom_op / Library("plr_kernels", "FRAGMENT"): a second "DEF"
// library for the namespace is an error once this extension is loaded.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

TORCH_LIBRARY(plr_kernels, m) {
  // The fake (meta) kernels live in Python; this tells torch which module to
  // import when it needs one (torch.compile, FakeTensorMode).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
  m.set_python_module("plr_kernels._extension");
#else
  m.impl_abstract_pystub("plr_kernels._extension");
#endif
  // exclude_index = -1: none. pessimistic=False counts ">" (ties favour the
  // target), True counts ">=". Returns int64 [B], 1 = best.
  m.def(
      "target_rank(Tensor z, Tensor item_emb, Tensor target, int exclude_index, "
      "Tensor? exclude_items, bool pessimistic) -> Tensor");
}

// `import plr_kernels._C` only has to load the shared library (which runs the
// registrations above); the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "plr_kernels compiled kernels (see torch.ops.plr_kernels)", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
