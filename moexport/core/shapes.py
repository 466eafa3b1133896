"""Input shapes given on the command line or to the API: ``name:[d0,d1,...]`` (polygraphy / trtexec style)."""
from __future__ import annotations

import numbers
import re

from moexport.core.errors import MoexportError


def parse_shapes(spec: str | dict | None) -> dict[str, tuple[int, ...]]:
    """Parse ``name:[d0,d1,...] name2:[...]`` (polygraphy/trtexec style) into {name: shape}; a dict is
    taken as it is. Every dimension must be at least 1."""
    if spec is None or isinstance(spec, dict):
        shapes = {name: tuple(shape) for name, shape in (spec or {}).items()}
    else:
        shapes = {}
        for item in spec.split():
            match = re.fullmatch(r"([^:\s]+):\[([\d,\s]*)\]", item)
            if not match:
                raise MoexportError(f"shape {item!r}", "is not of the form name:[d0,d1,...]",
                                    "e.g. input_ids:[1,128]")
            shapes[match.group(1)] = tuple(int(d) for d in match.group(2).split(",") if d.strip())
    for name, shape in shapes.items():
        if not all(isinstance(d, numbers.Integral) and d >= 1 for d in shape):
            raise MoexportError(f"shape '{name}:[{','.join(map(str, shape))}]'", "has a dimension below 1",
                                "every dimension must be a whole number >= 1, e.g. input_ids:[1,128]")
    return shapes

