"""The native launcher of kernel bundles (C++17 beside this file), compiled into both plugin libraries.

`moexport/native/*.cpp` read a bundle (`moexport.kernels.bundle`), choose the plan of a call's token
count, size its workspace and launch its steps through the CUDA driver API, which they open with
dlopen at first use: the libraries build without a CUDA toolkit and load on machines without a GPU.
The ONNX Runtime op library (`moexport/plugins/ort_ops.cpp`) and the TensorRT plugins
(`moexport/trt_plugins`) are thin hosts around it. From Python, `plan_call` asks a built library to
plan a call without launching it, which is how the tests check the C++ against the Python host.
"""
from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

from moexport.core.errors import MoexportError

_LOADED: dict[str, ctypes.CDLL] = {}


def built_library(beside: str | os.PathLike, name: str) -> Path:
    """The path of a native library that setup.py builds with the package into the folder of `beside`
    (a module's __file__).

    Raises:
        MoexportError: it was not built when moexport was installed (no C++17 compiler).
    """
    path = Path(beside).with_name(name)
    if not path.is_file():
        raise MoexportError(name, "was not built when moexport was installed (it needs a C++17 compiler, g++)",
                            "install g++ and reinstall moexport (pip install --force-reinstall --no-deps moexport, "
                            "or pip install -e . in a checkout)")
    return path


def load(path: str | os.PathLike) -> ctypes.CDLL:
    """A built plugin library, loaded once per process (ONNX Runtime or TensorRT may load it too: the
    dynamic loader hands everyone the same copy)."""
    key = str(Path(path).resolve())
    if key not in _LOADED:
        try:
            _LOADED[key] = ctypes.CDLL(key)
        except OSError as error:
            raise MoexportError(str(path), f"cannot be loaded: {error}") from None
    return _LOADED[key]


def plan_call(library: str | os.PathLike, bundle: bytes, inputs: list[dict | None]) -> dict:
    """How the native launcher plans a call of `bundle`: the chosen plan, symbols, output shapes,
    workspace layout and each step's grid and integer arguments (nothing is launched).

    Args:
        library: A plugin library built with moexport (both export the planner).
        bundle: The bundle's bytes.
        inputs: One entry per op input: None (absent) or {"dtype": name, "shape": [...]}.

    Raises:
        MoexportError: the launcher rejects the call; the message is its own.
    """
    planner = load(library).moexport_plan_call
    planner.restype = ctypes.c_size_t
    planner.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
    request = json.dumps(inputs).encode()
    size = 1 << 14
    while True:
        out = ctypes.create_string_buffer(size)
        needed = planner(bundle, len(bundle), request, out, size)
        if needed < size:
            break
        size = needed + 1
    answer = json.loads(out.value.decode())
    if "error" in answer:
        raise MoexportError("kernel bundle", answer["error"])
    return answer
