import numpy as np
import pytest
from PIL import Image
from tests_support import correlation as _corr

import bench.data.images as images
from bench.data.images import ImageCache, UnreadableImage, read_image, resize_and_pad, usable
from bench.data.synth.dicom_writers import write_dicom


def _drawing(h: int = 60, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 3 + y * 2) % 256).astype(np.uint8)



def test_png_jpg_in_8_and_16_bit_and_rgba_read_as_the_same_grayscale(tmp_path):
    img = _drawing()
    Image.fromarray(img).save(tmp_path / "gray.png")
    Image.fromarray(img).save(tmp_path / "gray.jpg", quality=95)
    Image.fromarray(img.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    rgba = np.dstack([img, img, img, np.full_like(img, 255)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert np.array_equal(read_image(tmp_path / "gray.png"), img)
    assert np.array_equal(read_image(tmp_path / "rgba.png"), img)
    assert np.abs(read_image(tmp_path / "deep.png").astype(int) - img).max() <= 1
    assert _corr(read_image(tmp_path / "gray.jpg"), img) > 0.99


@pytest.mark.parametrize("monochrome1, bits", [(False, 8), (True, 8), (False, 12), (True, 16)])
def test_dicom_variants_read_bright_where_dense(tmp_path, monochrome1, bits):
    img = _drawing()
    path = tmp_path / "x.dcm"
    write_dicom(path, img, patient_id="p", sop_uid="1.2.3.4", study_uid="1.2.3", series_uid="1.2.3.5",
                monochrome1=monochrome1, bits_stored=bits)
    assert _corr(read_image(path), img) > 0.98
    # the DICM magic is enough, whatever the file is called
    path.rename(tmp_path / "noext")
    assert _corr(read_image(tmp_path / "noext"), img) > 0.98


def test_unreadable_images_name_the_file(tmp_path):
    Image.fromarray(_drawing(200, 200)).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\1" * 40)
    for name in ("cut.jpg", "junk.png", "junk.dcm", "absent.png"):
        with pytest.raises(UnreadableImage, match=name):
            read_image(tmp_path / name)


def test_resize_and_pad_keeps_the_aspect_ratio_centred():
    out = resize_and_pad(np.full((100, 50), 200, np.uint8), 64)
    assert out.shape == (64, 64)
    assert (out[:, 16:48] == 200).all() and (out[:, :16] == 0).all() and (out[:, 48:] == 0).all()


def test_the_cache_decodes_each_file_once_and_notices_a_changed_file(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.fromarray(_drawing()).save(path)
    decoded = []
    real = images.read_image
    monkeypatch.setattr(images, "read_image", lambda p: decoded.append(p) or real(p))
    cache = ImageCache(tmp_path / "cache", 32)
    first = cache.get(path)
    assert np.array_equal(ImageCache(tmp_path / "cache", 32).get(path), first)  # a new run, same entry
    assert len(decoded) == 1
    Image.fromarray(255 - _drawing()).save(path)
    assert not np.array_equal(cache.get(path), first) and len(decoded) == 2
    assert ImageCache(tmp_path / "cache", 48).get(path).shape == (48, 48) and len(decoded) == 3


def test_unreadable_images_are_skipped_with_a_count_or_stop_the_run(tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.fromarray(_drawing()).save(good)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    paths = [str(good), str(tmp_path / "bad.png"), str(good)]
    cache = ImageCache(tmp_path / "cache", 32)
    assert usable(cache, paths, "skip", "set").tolist() == [True, False, True]
    assert "skipped 1 unreadable image(s) in set; first:" in capsys.readouterr().err
    with pytest.raises(UnreadableImage, match="bad.png.*1 unreadable image"):
        usable(cache, paths, "error", "set")


def test_parallel_decoding_agrees_with_serial_and_an_unwritable_cache_only_slows_down(tmp_path, capsys):
    for i in range(70):
        Image.fromarray(np.roll(_drawing(), i)).save(tmp_path / f"{i}.png")
    (tmp_path / "13.png").write_bytes(b"broken")
    paths = [str(tmp_path / f"{i}.png") for i in range(70)]
    serial = usable(ImageCache(tmp_path / "a", 32), paths, "skip", "set", workers=0)
    parallel = usable(ImageCache(tmp_path / "b", 32), paths, "skip", "set", workers=2)
    assert serial.tolist() == parallel.tolist() and serial.sum() == 69
    (tmp_path / "readonly").write_text("a file where the cache folder should be")
    cache = ImageCache(tmp_path / "readonly", 32)
    assert np.array_equal(cache.get(paths[0]), ImageCache(None, 32).get(paths[0]))
    assert "is not writable" in capsys.readouterr().err and cache.directory is None
