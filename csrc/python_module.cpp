// The Python extension module fisher_fast._C. Importing it loads the library, whose static
// initialisers register the ops with the dispatcher; the module itself only adds build_info().
// Written against the plain Python C API: the module needs no pybind11 or torch Python headers,
// which would make this file the slowest of the build to compile.
#include <Python.h>

#include <string>

#include "build_info.h"

namespace {

// Sets d[key] = value, taking ownership of value; false (with a Python error set) on failure.
bool set_item(PyObject* d, const char* key, PyObject* value) {
  if (value == nullptr) return false;
  const int status = PyDict_SetItemString(d, key, value);
  Py_DECREF(value);
  return status == 0;
}

PyObject* str(const std::string& s) { return PyUnicode_FromStringAndSize(s.data(), s.size()); }

PyObject* build_info(PyObject* /*self*/, PyObject* /*args*/) {
  const auto info = fisher_fast::build_info();
  PyObject* d = PyDict_New();
  if (d == nullptr) return nullptr;
  const bool ok = set_item(d, "version", str(info.version)) &&
                  set_item(d, "torch_version", str(info.torch_version)) &&
                  set_item(d, "cpu_kernels", PyBool_FromLong(info.cpu_kernels)) &&
                  set_item(d, "cuda_kernels", PyBool_FromLong(info.cuda_kernels)) &&
                  set_item(d, "cuda_version", str(info.cuda_version)) &&
                  set_item(d, "cuda_arch_list", str(info.cuda_arch_list)) &&
                  set_item(d, "debug", PyBool_FromLong(info.debug)) &&
                  set_item(d, "num_threads", PyLong_FromLong(info.num_threads)) &&
                  set_item(d, "cxx_compiler", str(info.cxx_compiler)) &&
                  set_item(d, "cuda_compiler", str(info.cuda_compiler)) &&
                  set_item(d, "cuda_host_compiler", str(info.cuda_host_compiler));
  if (!ok) {
    Py_DECREF(d);
    return nullptr;
  }
  return d;
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "Facts about this build: versions, compilers, which kernels were compiled, architectures, "
     "threads."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "fisher_fast compiled kernels",
    -1,
    methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
