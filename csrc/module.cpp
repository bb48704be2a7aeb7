// The Python module `minalign._C`. Importing it loads this library, whose static
// initialisers register the operators (ops.cpp) and their kernels with PyTorch's
// dispatcher as torch.ops.minalign.*; the module itself only says whether the
// CUDA kernels were compiled in (minalign._C.WITH_CUDA).

#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "minalign's C++/CUDA operators", -1, nullptr};
  PyObject* m = PyModule_Create(&module);
#ifdef MINALIGN_WITH_CUDA
  const int with_cuda = 1;
#else
  const int with_cuda = 0;
#endif
  if (m != nullptr && PyModule_AddIntConstant(m, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
