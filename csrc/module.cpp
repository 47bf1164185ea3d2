// Python module `adaface._C`. Importing it runs the static TORCH_LIBRARY registrations of the other
// translation units in this folder, which define the `torch.ops.adaface.*` C++/CUDA ops.
#include <Python.h>

static struct PyModuleDef adaface_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "AdaFace C++/CUDA kernels, registered as torch.ops.adaface.*", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&adaface_c_module);
  if (m == nullptr) return nullptr;
#ifdef ADAFACE_WITH_CUDA
  PyModule_AddIntConstant(m, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(m, "WITH_CUDA", 0);
#endif
  return m;
}
