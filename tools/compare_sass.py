"""Whether a change alters the machine code of the shipped kernels: the SASS of every kernel of the
benchmark cells (`moexport bench kernels`), compiled for sm_90 on this machine, hashed without line
info, printed as JSON. Run it in two checkouts and compare: equal hashes mean the benchmark's figures
cannot have changed.

    PYTHONPATH=CHECKOUT python tools/compare_sass.py > sass.json
"""
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import triton

from moexport.bench.kernels import SHAPES, TOKENS
from moexport.kernels.aot import compile_plan
from moexport.kernels.plan import MoEShape, sigma_moe_plan

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def sass_digest(cubin: Path) -> str:
    """A digest of the instructions alone (no addresses, comments or debug lines)."""
    listing = subprocess.run([str(CUOBJDUMP), "--dump-sass", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    instructions = [line.split(";")[0] for line in listing.splitlines() if line.strip().startswith("/*") and ";" in line]
    return hashlib.sha256("\n".join(instructions).encode()).hexdigest()[:12]


def main() -> None:
    digests = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, (d, E, G, k) in SHAPES.items():
            for T in TOKENS:
                manifest = json.loads(compile_plan(sigma_moe_plan(MoEShape(d, E, G, d, k, "bfloat16"), T), folder,
                                                   sm=90, name=f"{name}_{T}").read_text())
                for index, step in enumerate(manifest["steps"]):
                    digests[f"{name} T={T} step {index} {step['kernel']}"] = sass_digest(Path(folder) / step["cubin"])
    json.dump(digests, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
