// The Python module saffnet_fast._C. Loading it runs the static TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL registrations of every op; the only Python-level function is
// build_info(), read by saffnet_fast._native.native_build_info().
#include <pybind11/pybind11.h>

#ifndef SAFFNET_TORCH_VERSION
#define SAFFNET_TORCH_VERSION "unknown"
#endif
#ifndef SAFFNET_CUDA_VERSION
#define SAFFNET_CUDA_VERSION ""
#endif
#ifndef SAFFNET_CUDA_ARCH_LIST
#define SAFFNET_CUDA_ARCH_LIST ""
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
#ifdef WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = SAFFNET_CUDA_VERSION;
  info["cuda_arch_list"] = SAFFNET_CUDA_ARCH_LIST;
#else
  info["with_cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_arch_list"] = py::none();
#endif
  info["torch_version"] = SAFFNET_TORCH_VERSION;
#ifdef SAFFNET_DEBUG
  info["debug"] = true;
#else
  info["debug"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "saffnet_fast native kernels (ops registered under torch.ops.saffnet_fast)";
  m.def("build_info", &build_info,
        "dict: with_cuda, cuda_version, cuda_arch_list, torch_version, debug, openmp");
}
