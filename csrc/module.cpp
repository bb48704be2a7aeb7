// The Python module `minalign._C`. Importing it loads this library, whose static
// initialisers register the operators (ops.cpp) and their kernels with PyTorch's
// dispatcher as torch.ops.minalign.*; the module itself only says whether the
// CUDA kernels were compiled in (minalign._C.WITH_CUDA), and whether at::parallel_for
// runs the CPU kernels on torch's intra-op threads (INTRA_OP_PARALLEL: with torch's
// OpenMP backend, only when compiled with -fopenmp).

#include <ATen/Parallel.h>
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "minalign's C++/CUDA operators", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef MINALIGN_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
#ifdef INTRA_OP_PARALLEL
  const int intra_op_parallel = 1;
#else
  const int intra_op_parallel = 0;
#endif
  if (m != nullptr && (PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) != 0 ||
                       PyModule_AddIntConstant(m, "INTRA_OP_PARALLEL", intra_op_parallel) != 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
