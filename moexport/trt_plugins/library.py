"""The TensorRT plugin library of the moexport op set (`libmoexport_trt.so`), and getting it into TensorRT.

The library is built with the package from `trt_ops.cpp` (setup.py) against vendored TensorRT headers
and links to no TensorRT: TensorRT loads it by path (`IPluginRegistry.load_library`, trtexec
`--dynamicPlugins`, or a copy serialised into an engine) and finds its creators through `getCreators`.

TensorRT-RTX has one snag, handled here: when it adds a plugin layer, it opens its own library by the
name ``libtensorrt_rtx.so``, which its wheel does not ship (only ``libtensorrt_rtx.so.1``), and where
that name resolves to nothing the process aborts ("terminate called without an active exception").
The package builds an alias for it (`libmoexport_rtx_alias.so`: soname ``libtensorrt_rtx.so``, one
dependency, ``libtensorrt_rtx.so.1``); loaded by path once TensorRT-RTX is, it makes the dynamic
loader answer that name with the library already loaded (a name matches a loaded library's soname),
and symbols looked up through it are found in its dependency. Nothing in the user's environment
or in TensorRT-RTX's folder changes.
"""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path
from types import ModuleType

from moexport.core.errors import MoexportError
from moexport.native import built_library

LIBRARY = "libmoexport_trt.so"
RTX_ALIAS = "libmoexport_rtx_alias.so"
RTX_NAME = "libtensorrt_rtx.so"  # the name TensorRT-RTX opens itself by

_REGISTERED: dict[str, object] = {}  # backend module name -> the registry's handle of the library


def trt_library() -> Path:
    """Path of the plugin library, for `IPluginRegistry.load_library` (Python), `loadLibrary` (C++),
    trtexec ``--dynamicPlugins`` or polygraphy ``--plugins``.

    Raises:
        MoexportError: the library was not built when moexport was installed (no C++17 compiler).
    """
    return built_library(__file__, LIBRARY)


def _rtx_name_resolves() -> bool:
    """Whether TensorRT-RTX's dlopen of its own bare name will find a library."""
    try:
        ctypes.CDLL(RTX_NAME)  # the same search, or a loaded library of that soname
        return True
    except OSError:
        pass
    spec = importlib.util.find_spec("tensorrt_rtx_libs")  # its own folder comes first in its search
    return bool(spec and spec.origin and (Path(spec.origin).parent / RTX_NAME).exists())


def prepare_rtx() -> None:
    """Make TensorRT-RTX's name for itself resolve in this process (see the module's docstring).

    Raises:
        MoexportError: neither the alias nor the name are found: the parser would abort the process.
    """
    if _rtx_name_resolves():
        return
    alias = Path(__file__).with_name(RTX_ALIAS)
    problem = None
    if alias.is_file():
        try:
            ctypes.CDLL(str(alias))
        except OSError as error:
            problem = f"its alias {alias.name} does not load: {error}"
        if problem is None and _rtx_name_resolves():
            return
    raise MoexportError(
        "TensorRT-RTX", problem or f"opens its own library as {RTX_NAME} when it adds a plugin layer, and nothing of "
        "that name is found (its wheel ships libtensorrt_rtx.so.1); building would abort the process",
        f"reinstall moexport where g++ is found (it builds {RTX_ALIAS}), or start Python with LD_LIBRARY_PATH "
        f"naming a folder that holds a symlink {RTX_NAME} -> libtensorrt_rtx.so.1")


def register_plugins(trt: ModuleType) -> Path:
    """Load the plugin library into the plugin registry of `trt` (tensorrt or tensorrt_rtx), once per
    process, after `prepare_rtx` for TensorRT-RTX.

    Returns:
        The library's path.

    Raises:
        MoexportError: the library is missing or TensorRT does not load it.
    """
    path = trt_library()
    if trt.__name__ == "tensorrt_rtx":
        prepare_rtx()
    if trt.__name__ not in _REGISTERED:
        handle = trt.get_plugin_registry().load_library(str(path))
        if handle is None:
            raise MoexportError(str(path), f"is not loaded by {trt.__name__} {trt.__version__}",
                                "run with a verbose TensorRT logger for the reason")
        _REGISTERED[trt.__name__] = handle
    return path
