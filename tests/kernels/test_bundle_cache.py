"""Built kernel bundles are cached: the same configuration is compiled once, in any process."""
import pytest

from moexport.kernels import bundle as bundles


@pytest.fixture
def kernels():
    return bundles.topk_dispatch_kernels(6, 2, "sigmoid", max_tokens=16)


def test_a_bundle_is_compiled_once_then_read_from_the_cache(kernels, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEXPORT_CACHE_DIR", str(tmp_path))
    first = bundles.build_bundle(kernels, archs=(90,))
    assert len(list(tmp_path.glob("*.bundle"))) == 1
    monkeypatch.setattr(bundles, "_build", lambda *args, **options: pytest.fail("compiled again"))
    assert bundles.build_bundle(kernels, archs=(90,)) == first


def test_another_configuration_or_target_is_compiled(kernels, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEXPORT_CACHE_DIR", str(tmp_path))
    built = []
    monkeypatch.setattr(bundles, "_build", lambda kernels, **options: built.append(options) or b"bundle")
    other = bundles.topk_dispatch_kernels(6, 3, "sigmoid", max_tokens=16)
    for configuration, archs in ((kernels, (90,)), (kernels, (80, 90)), (other, (90,)), (kernels, (90,))):
        bundles.build_bundle(configuration, archs=archs)
    assert len(built) == 3 and len(list(tmp_path.glob("*.bundle"))) == 3


def test_the_cache_can_be_turned_off(kernels, monkeypatch):
    monkeypatch.setenv("MOEXPORT_CACHE_DIR", "off")
    built = []
    monkeypatch.setattr(bundles, "_build", lambda kernels, **options: built.append(options) or b"bundle")
    bundles.build_bundle(kernels, archs=(90,))
    bundles.build_bundle(kernels, archs=(90,))
    assert len(built) == 2
