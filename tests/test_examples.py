"""stepdiff.examples: the documentation's example pictures, drawn on demand, and the files they are written to."""

import numpy as np
import pytest

from stepdiff import examples


def test_pictures_are_the_shipped_models_size_and_show_what_they_say():
    picture = np.asarray(examples.red_circle())
    assert picture.shape == (64, 64, 3)
    assert tuple(picture[32, 32]) == (220, 20, 20) and tuple(picture[2, 2]) == (30, 60, 230)  # red circle, blue ground
    background, box, control = (np.asarray(f()) for f in (examples.background_mask, examples.box_mask, examples.silhouette))
    assert background.shape == box.shape == (64, 64)
    assert background[2, 2] == 255 and background[32, 32] == 0  # white repaints the background, keeps the circle
    assert box[32, 32] == 255 and box[2, 2] == 0
    red = (np.abs(picture.astype(int) - (220, 20, 20)).sum(-1) < 60)
    assert not (red & (background >= 128)).any() and (box[red] == 255).all()  # masks fit the circle
    assert control.shape == (64, 64, 3) and control.min() == 0 and control.max() == 255
    assert control[:, :32].mean() > control[:, 32:].mean()  # the triangle sits left of centre


def test_pictures_are_deterministic():
    for make in examples.FILES.values():
        assert np.array_equal(np.asarray(make()), np.asarray(make()))


def test_edit_masks_refuses_a_picture_without_a_shape():
    from PIL import Image

    with pytest.raises(ValueError, match="no shape"):
        examples.edit_masks(Image.new("RGB", (64, 64), "blue"))


def test_write_makes_the_files_again_and_again_but_never_replaces_another_file(tmp_path):
    from PIL import Image

    folder = tmp_path / "new" / "pictures"
    paths = examples.write(folder)
    assert [p.name for p in paths] == list(examples.FILES) == ["red-circle.png", "background-mask.png", "box-mask.png",
                                                               "silhouette.png"]
    for path, make in zip(paths, examples.FILES.values()):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(make()))
    assert examples.write(folder) == paths  # the same pictures again: nothing to refuse
    (folder / "box-mask.png").write_bytes(b"mine")
    (folder / "red-circle.png").unlink()
    with pytest.raises(FileExistsError, match="box-mask.png"):
        examples.write(folder)
    assert not (folder / "red-circle.png").exists()  # refused before anything was written
    assert (folder / "box-mask.png").read_bytes() == b"mine"
    examples.write(folder, overwrite=True)
    assert np.array_equal(np.asarray(Image.open(folder / "box-mask.png")), np.asarray(examples.box_mask()))
    assert sorted(p.name for p in folder.iterdir()) == sorted(examples.FILES)  # no temporary file left
    with pytest.raises(NotADirectoryError):
        examples.write(folder / "red-circle.png")


def test_module_command_prints_the_paths_and_exits_2_in_one_line(tmp_path, capsys):
    assert examples.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / name) for name in examples.FILES]
    (tmp_path / "silhouette.png").write_bytes(b"mine")
    assert examples.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "silhouette.png" in err and "overwrite" in err
    assert examples.main([str(tmp_path), "--overwrite"]) == 0
