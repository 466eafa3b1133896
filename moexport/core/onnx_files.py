"""Reading and writing ONNX files: one clear error for an unreadable file, never a half-written one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from moexport.core.errors import InternalError, MoexportError, first_line

_TWO_GB = 2**31
DTYPE_KEY = "moexport.dtype"  # metadata: the dtype the model was exported in (validate's tolerances)
# ONNX element type -> dtype name of the float types moexport models compute in
FLOAT_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.BFLOAT16: "bfloat16"}
ELEMENT_TYPES = {name: elem_type for elem_type, name in FLOAT_TYPES.items()}  # the other way


def record_dtype(model: onnx.ModelProto, dtype: str) -> onnx.ModelProto:
    """Write the dtype the model computes in into its metadata (`DTYPE_KEY`), replacing any record."""
    kept = [p for p in model.metadata_props if p.key != DTYPE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=DTYPE_KEY, value=dtype)
    return model


def model_dtype(model: onnx.ModelProto) -> str | None:
    """The dtype a model computes in: its `DTYPE_KEY` record, else (files written before the record, or by
    other tools) the type of its first floating-point output; None when neither says."""
    recorded = {p.key: p.value for p in model.metadata_props}.get(DTYPE_KEY)
    if recorded:
        return recorded
    types = (o.type.tensor_type.elem_type for o in model.graph.output)
    return next((FLOAT_TYPES[t] for t in types if t in FLOAT_TYPES), None)


def load_model(path: str | os.PathLike, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX file (its external data too unless `load_external_data` is False).

    Raises:
        MoexportError: The file does not exist or is not a readable ONNX model.
    """
    path = Path(path)
    if not path.is_file():
        raise MoexportError(str(path), "does not exist", "give the path of an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as error:  # protobuf and IO errors of a corrupt file
        raise MoexportError(str(path), f"is not a readable ONNX model ({first_line(error)})") from None
    # Protobuf reads an empty file (and some other bytes) as an empty message without complaint.
    if not model.HasField("graph") or not model.graph.output:
        found = "is empty" if path.stat().st_size == 0 else "holds no ONNX graph (or one without outputs)"
        raise MoexportError(str(path), found, "give an .onnx file written by `moexport export` or `moexport fuse`")
    return model


def save_model(model: onnx.ModelProto, path: Path, *, check: bool = True) -> None:
    """Write `model` atomically (checked by onnx.checker unless `check` is False); weights go to
    `<name>.data` when it is over 2 GB."""
    external = model.ByteSize() >= _TWO_GB
    data_name = path.name + ".data"
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as folder:
        temporary = Path(folder) / path.name
        onnx.save_model(model, str(temporary), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        try:
            if check:
                onnx.checker.check_model(str(temporary), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
            raise InternalError(f"{path}: the exported graph fails onnx.checker: {first_line(error)}") from None
        if external:
            os.replace(Path(folder) / data_name, path.parent / data_name)
        os.replace(temporary, path)

