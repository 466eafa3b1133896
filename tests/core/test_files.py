import os
import stat

import pytest

from moexport import MoexportError, save_checkpoint
from moexport.core import write_atomically
from moexport.core.files import check_output_file, check_output_folder
from moexport.models import SigmaMoE


def test_a_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    write_atomically(target, lambda tmp: tmp.write_text("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"] and target.read_text() == "new"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, broken)
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"] and target.read_text() == "old"


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o640  # 0666 less the umask
    os.umask(previous)


def test_a_written_file_gets_the_umasks_mode_whatever_the_writer_made(tmp_path, umask_027):
    def private(tmp):  # as safetensors' save_file does
        tmp.touch(mode=0o600)

    write_atomically(tmp_path / "out.bin", private)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == umask_027


def test_a_saved_checkpoint_gets_the_umasks_mode(tmp_path, umask_027):
    folder = save_checkpoint(SigmaMoE(8, 4, 4, 2), tmp_path / "ckpt")
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
        "config.json": umask_027, "model.safetensors": umask_027}


def test_output_paths_are_checked_without_writing_anything(tmp_path):
    (tmp_path / "file").write_text("")
    assert check_output_file(tmp_path / "x.onnx") == tmp_path / "x.onnx"
    assert check_output_folder(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    cases = [(check_output_file, tmp_path, "is a folder"),
             (check_output_file, tmp_path / "no" / "x.onnx", "is in a folder that does not exist"),
             (check_output_file, tmp_path / "file" / "x.onnx", "which is a file, not a folder"),
             (check_output_folder, tmp_path / "file", "is a file, not a folder"),
             (check_output_folder, tmp_path / "file" / "a" / "b", "cannot be created: .*file is a file")]
    for check, path, message in cases:
        with pytest.raises(MoexportError, match=message):
            check(path)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc (read-only even for root)")
def test_a_location_nobody_can_write_is_refused_even_for_root():
    for check in (check_output_file, check_output_folder):
        with pytest.raises(MoexportError, match=r"/proc/moexport-x \| cannot be written"):
            check("/proc/moexport-x")
