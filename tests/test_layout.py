"""The package's rooms and its start-up: what CI holds so the tree keeps explaining the architecture."""
import shutil
import subprocess
import sys

import pytest


def test_rooms_import_only_from_the_rooms_to_their_left():
    lint = shutil.which("lint-imports")
    if lint is None:
        pytest.fail("lint-imports (import-linter, in the dev extra) is not installed")
    done = subprocess.run([lint], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


@pytest.mark.parametrize("code", ["import moexport", "import moexport.cli; moexport.cli.build_parser()"])
def test_start_up_imports_neither_torch_nor_onnx(code):
    """`import moexport` and `moexport -h` load the rooms they need only when a name is used."""
    probe = f"{code}; import sys; print(sorted(m for m in ('torch', 'onnx', 'onnxscript', 'triton') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_public_api_resolves_lazily():
    import moexport

    assert callable(moexport.export_onnx) and callable(moexport.fuse) and callable(moexport.load_checkpoint)
    assert moexport.models.SigmaMoE is moexport.models.sigma_moe.SigmaMoE
    with pytest.raises(AttributeError):
        getattr(moexport, "no_such_name")
