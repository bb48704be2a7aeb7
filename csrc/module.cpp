// The Python module `minalign._C`. Importing it loads this library, whose static
// initialisers register the operators (ops.cpp) and their kernels with PyTorch's
// dispatcher as torch.ops.minalign.*; the module itself only says whether the
// CUDA kernels were compiled in (minalign._C.WITH_CUDA), whether at::parallel_for
// runs the CPU kernels on torch's intra-op threads (INTRA_OP_PARALLEL: with torch's
// OpenMP backend, only when compiled with -fopenmp), and which build of the CPU
// kernels' vector loops runs (cpu_kernels()).

#include <ATen/Parallel.h>
#include <Python.h>
#include <c10/util/Exception.h>

#include "cpu_blocks.h"

// "avx512", "avx2" or "baseline"; a MINALIGN_CPU_BLOCKS this CPU or build cannot honour
// raises ValueError (with the message the kernels would raise at their first call).
static PyObject* cpu_kernels(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(minalign::cpu_blocks().name);
  } catch (const c10::Error& error) {
    PyErr_SetString(PyExc_ValueError, error.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& error) {  // nothing may leave a function Python calls
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

extern "C" PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_kernels", cpu_kernels, METH_NOARGS, "The build of the CPU kernels' vector loops this process runs."},
      {nullptr, nullptr, 0, nullptr}};
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "minalign's C++/CUDA operators", -1, methods};
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
