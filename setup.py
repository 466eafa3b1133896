"""Builds the native plugin libraries (C++17, g++) with the package: see `moexport/native/`.

They are plain shared libraries, not Python extension modules: ONNX Runtime and TensorRT load them by
path (`moexport.plugins.ort_library()`, `moexport.trt_plugins.trt_library()`). Each is optional, so that
the package installs where no C++ compiler is found; the library's absence is then reported when it is
asked for. Neither links to its runtime: both build from vendored headers (third_party/) alone.
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NATIVE = ["moexport/native/json.cpp", "moexport/native/expr.cpp", "moexport/native/cuda_driver.cpp",
          "moexport/native/bundle.cpp", "moexport/native/ops.cpp", "moexport/native/capi.cpp"]


TRT = ["third_party/tensorrt-11.1/include", "moexport/trt_plugins/cuda_stub"]  # headers of the TensorRT libraries


class SharedLibrary(Extension):
    """A C++ shared library named lib<name>.so in its package folder."""

    def __init__(self, name: str, sources: list[str], include_dirs: list[str], system_include_dirs=(), *,
                 native: bool = True):
        # third-party headers as system headers: their own deprecation warnings are not ours to fix
        system = [arg for folder in system_include_dirs for arg in ("-isystem", folder)]
        super().__init__(name, sources=(NATIVE if native else []) + sources, include_dirs=include_dirs, language="c++",
                         extra_compile_args=["-std=c++17", "-O2", "-g0", "-fvisibility=hidden", "-Wall", *system],
                         extra_link_args=["-s", "-Wl,--no-undefined"],  # every symbol resolved when built
                         libraries=["dl"], optional=True)


class RtxAlias(Extension):
    """libmoexport_rtx_alias.so: no code, the soname libtensorrt_rtx.so and the dependency
    libtensorrt_rtx.so.1, which lets TensorRT-RTX open itself by the name it uses
    (moexport/trt_plugins/library.py). Linked against a stub of that library made here: building it
    needs no TensorRT-RTX."""

    def __init__(self):
        super().__init__("moexport.trt_plugins.libmoexport_rtx_alias", sources=["moexport/trt_plugins/rtx_alias.c"],
                         optional=True)


class BuildSharedLibraries(build_ext):
    def build_extension(self, ext):
        if isinstance(ext, RtxAlias):
            stub_dir = os.path.join(self.build_temp, "rtx_stub")
            objects = self.compiler.compile(ext.sources, output_dir=os.path.join(stub_dir, "obj"))
            self.compiler.link_shared_object(objects, "libtensorrt_rtx.so.1", output_dir=stub_dir,
                                             extra_postargs=["-Wl,-soname,libtensorrt_rtx.so.1"])
            ext.extra_link_args = ["-Wl,-soname,libtensorrt_rtx.so", "-Wl,--no-as-needed", f"-L{stub_dir}",
                                   "-l:libtensorrt_rtx.so.1"]
        super().build_extension(ext)

    def get_ext_filename(self, fullname: str) -> str:
        # called with the dotted name, or (in-place builds) with its last part: no Python ABI suffix
        return fullname.replace(".", "/") + ".so"

    def get_export_symbols(self, ext):  # not a Python module: no PyInit_ entry point
        return []


setup(
    ext_modules=[SharedLibrary("moexport.plugins.libmoexport_ort", ["moexport/plugins/ort_ops.cpp"],
                               ["third_party/onnxruntime-1.21/include"]),
                 SharedLibrary("moexport.trt_plugins.libmoexport_trt", ["moexport/trt_plugins/trt_ops.cpp"], [], TRT),
                 # drives a plugin library as TensorRT does, where there is no TensorRT (harness.py)
                 SharedLibrary("moexport.trt_plugins.libmoexport_trt_harness", ["moexport/trt_plugins/harness.cpp"], [],
                               TRT, native=False),
                 RtxAlias()],
    cmdclass={"build_ext": BuildSharedLibraries},
)
