"""RSNA Pneumonia and SIIM-ACR Pneumothorax: the DICOM writers, the SIIM run-length code and both adapters."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from tests_support import correlation as _corr
from tests_support import tree_digest as _digest

from bench.core.errors import UserError
from bench.data.images import read_image
from bench.data.rle import rle_decode, rle_encode
from bench.data.synth.dicom_writers import (RSNA_OPACITIES, SIZE, boxes, rsna_case, siim_case, write_dicom, write_rsna,
                                            write_siim)
from bench.datasets.rsna import Rsna
from bench.datasets.siim import Siim

SEED = 3
N_RSNA, N_SIIM = 48, 64


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rsna") / "rsna-pneumonia-detection-challenge"
    write_rsna(root, N_RSNA, SEED, workers=2)
    return root


@pytest.fixture(scope="module")
def siim_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("siim") / "siim-acr-pneumothorax"
    write_siim(root, N_SIIM, SEED, workers=2)
    return root




def _assert_patient_disjoint(manifest: pd.DataFrame) -> None:
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert (manifest.groupby("patient_id")["split"].nunique() == 1).all()


# --- DICOM files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("monochrome1,bits", [(False, 8), (True, 8), (False, 12), (True, 12), (False, 16)])
def test_dicom_variants_read_back_as_drawn(tmp_path, monochrome1, bits):
    case = rsna_case(SEED, 1)
    path = tmp_path / "x.dcm"
    write_dicom(path, case.pixels, patient_id="p1", sop_uid="1.2.3.4", study_uid="1.2.3.2", series_uid="1.2.3.3",
                monochrome1=monochrome1, bits_stored=bits, sex="Female", age=7)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.PhotometricInterpretation == ("MONOCHROME1" if monochrome1 else "MONOCHROME2")
    assert (ds.BitsStored, ds.BitsAllocated) == (bits, 8 if bits == 8 else 16)
    assert (ds.SOPInstanceUID, ds.file_meta.MediaStorageSOPInstanceUID) == ("1.2.3.4", "1.2.3.4")
    assert (ds.PatientSex, ds.PatientAge) == ("F", "007Y")
    raw = ds.pixel_array
    assert raw.max() <= 2**bits - 1
    # stored values are inverted for MONOCHROME1: raw pixels anti-correlate with the drawing
    assert _corr(raw, case.pixels) == pytest.approx(-1.0 if monochrome1 else 1.0, abs=1e-6)
    if bits > 8:
        assert "WindowCenter" in ds and float(ds.RescaleIntercept) == -1024.0
        assert raw.max() - raw.min() > 255 * 8  # spread over the depth, not an 8-bit image in 16-bit words
    image = read_image(path)
    assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8
    assert _corr(image, case.pixels) > 0.98


def test_writers_are_deterministic_by_seed_and_not_by_workers(tmp_path):
    for name, write in (("rsna", write_rsna), ("siim", write_siim)):
        write(tmp_path / f"{name}-a", 10, SEED, workers=1)
        write(tmp_path / f"{name}-b", 10, SEED, workers=2)
        write(tmp_path / f"{name}-c", 10, SEED + 1, workers=1)
        assert _digest(tmp_path / f"{name}-a") == _digest(tmp_path / f"{name}-b")
        assert _digest(tmp_path / f"{name}-a") != _digest(tmp_path / f"{name}-c")


# --- RSNA --------------------------------------------------------------------------------------------------

def test_rsna_layout_copies_the_kaggle_files(rsna_root):
    labels_text = (rsna_root / "stage_2_train_labels.csv").read_text().splitlines()
    assert labels_text[0] == "patientId,x,y,width,height,Target"
    assert any(re.fullmatch(r"[0-9a-f-]{36},,,,,0", line) for line in labels_text)  # blank boxes for negatives
    assert any(re.fullmatch(r"[0-9a-f-]{36},\d+\.0,\d+\.0,\d+\.0,\d+\.0,1", line) for line in labels_text)
    labels = pd.read_csv(rsna_root / "stage_2_train_labels.csv")
    info = pd.read_csv(rsna_root / "stage_2_detailed_class_info.csv")
    assert list(info.columns) == ["patientId", "class"]
    assert info["patientId"].tolist() == labels["patientId"].tolist()  # row-aligned, duplicates included
    assert ((info["class"] == "Lung Opacity") == (labels["Target"] == 1)).all()
    assert set(info["class"]) == {"Lung Opacity", "Normal", "No Lung Opacity / Not Normal"}
    assert labels["patientId"].str.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}").all()
    assert labels["patientId"].value_counts().max() > 1  # several boxes for one patient
    assert labels.loc[labels["Target"] == 0, ["x", "y", "width", "height"]].isna().all().all()
    files = sorted(p.stem for p in (rsna_root / "stage_2_train_images").glob("*.dcm"))
    assert files == sorted(labels["patientId"].unique())
    headers = [pydicom.dcmread(p, stop_before_pixels=True)
               for p in sorted((rsna_root / "stage_2_train_images").glob("*.dcm"))]
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert {h.BitsStored for h in headers} == {8, 12}
    files = sorted((rsna_root / "stage_2_train_images").glob("*.dcm"))
    assert all(h.PatientID == p.stem for h, p in zip(headers, files))


def test_rsna_boxes_and_target_follow_the_drawing(rsna_root):
    labels = pd.read_csv(rsna_root / "stage_2_train_labels.csv")
    for i in range(N_RSNA):
        case = rsna_case(SEED, i)
        rows = labels[labels["patientId"] == case.patient_id]
        drawn = bool(set(RSNA_OPACITIES) & set(case.patient.findings))
        assert rows["Target"].max() == int(drawn) == int(case.mask.any())
        if drawn:
            got = sorted(tuple(int(v) for v in r) for r in rows[["x", "y", "width", "height"]].to_numpy())
            assert got == sorted(boxes(case.mask))
            union = np.zeros_like(case.mask)
            for x, y, w, h in got:
                union[y:y + h, x:x + w] = True
            assert (case.mask <= union).all()  # every opacity pixel lies in a box


def test_boxes_are_component_bounding_boxes():
    mask = np.zeros((10, 12), bool)
    mask[1:3, 2:5] = True
    mask[6:9, 8] = True
    mask[5, 7] = True  # touches the second component diagonally: one component
    assert sorted(boxes(mask)) == [(2, 1, 3, 2), (7, 5, 2, 4)]


def test_rsna_adapter_reads_one_row_per_patient(rsna_root):
    manifest = Rsna(rsna_root).read()
    labels = pd.read_csv(rsna_root / "stage_2_train_labels.csv")
    assert len(manifest) == N_RSNA == labels["patientId"].nunique()
    assert list(manifest.columns) == ["sample_id", "patient_id", "image_path", "split", "Pneumonia"]
    assert manifest["sample_id"].is_unique
    expected = labels.groupby("patientId")["Target"].max().astype(float)
    assert manifest.set_index("sample_id")["Pneumonia"].sort_index().equals(expected.sort_index().rename("Pneumonia"))
    assert 0 < manifest["Pneumonia"].sum() < N_RSNA
    _assert_patient_disjoint(manifest)
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in manifest["image_path"])
    by_id = {rsna_case(SEED, i).patient_id: rsna_case(SEED, i) for i in (1, 2, 3)}  # MONOCHROME1, 12-bit, plain
    for pid, case in by_id.items():
        path = manifest.loc[manifest["sample_id"] == pid, "image_path"].item()
        assert _corr(read_image(path), case.pixels) > 0.98
    assert Rsna(rsna_root, {"val_fraction": 0.0, "test_fraction": 0.5}).read()["split"].value_counts().to_dict().keys() \
        == {"train", "test"}


def _rsna_labels(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "rsna"
    root.mkdir()
    (root / "stage_2_train_labels.csv").write_text(text)
    return root


@pytest.mark.parametrize("text,message", [
    ("patientId,x,y,width,height,Label\na,,,,,0\n", r"missing column\(s\) 'Target'"),
    ("patientId,x,y,width,height,Target\na,,,,,0\nb,1.0,2.0,3.0,4.0,2\n", r"line 3: column 'Target' has value '2'"),
    ("patientId,x,y,width,height,Target\na,,,,,0\nb,,,,,yes\n", r"line 3: column 'Target' has value 'yes'"),
    ("patientId,x,y,width,height,Target\na,,,,,\n", r"line 2: patientId and Target must not be blank"),
])
def test_rsna_bad_labels_name_file_and_line(tmp_path, text, message):
    root = _rsna_labels(tmp_path, text)
    with pytest.raises(UserError, match=re.escape(str(root / "stage_2_train_labels.csv")) + ".*" + message):
        Rsna(root).read()


def test_rsna_wrong_root(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Rsna(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"has none of stage_2_train_labels\.csv"):
        Rsna(tmp_path).read()


def test_rsna_metadata_only_root_needs_no_images(tmp_path):
    root = _rsna_labels(tmp_path, "patientId,x,y,width,height,Target\na,1.0,2.0,3.0,4.0,1\na,5.0,6.0,7.0,8.0,1\n"
                                  "b,,,,,0\n")
    manifest = Rsna(root, {"images_dir": "pngs"}).read()
    assert manifest[["sample_id", "Pneumonia"]].values.tolist() == [["a", 1.0], ["b", 0.0]]
    assert manifest["image_path"].tolist() == [str(root / "pngs" / "a.dcm"), str(root / "pngs" / "b.dcm")]


# --- SIIM --------------------------------------------------------------------------------------------------

def test_rle_code_by_hand():
    mask = np.array([[0, 1, 0],
                     [1, 1, 0]], bool)
    # column-major: positions 1 (r1c0), 2 (r0c1), 3 (r1c1) -> one run starting at 1 of length 3
    assert rle_encode(mask) == "1 3"
    assert rle_encode(np.array([[1, 0], [0, 1]], bool)) == "0 1 2 1"  # second start counts from the first's end
    assert (rle_decode(" 0 1 2 1", 2, 2) == np.array([[1, 0], [0, 1]], bool)).all()
    assert rle_encode(np.zeros((4, 4), bool)) == "-1"
    for code in (" -1", "-1"):
        assert not rle_decode(code, 4, 5).any() and rle_decode(code, 4, 5).shape == (4, 5)
    with pytest.raises(ValueError, match="pairs"):
        rle_decode("1 2 3", 4, 4)
    with pytest.raises(ValueError, match="past the end"):
        rle_decode("10 7", 4, 4)


def test_rle_round_trip_on_random_masks():
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (7, 5), (32, 32), (9, 40)):
        for density in (0.0, 0.1, 0.5, 1.0):
            mask = rng.random(shape) < density
            decoded = rle_decode(rle_encode(mask), *shape)
            assert decoded.shape == shape and (decoded == mask).all()


def test_siim_layout_copies_the_kaggle_files(siim_root):
    lines = (siim_root / "train-rle.csv").read_text().splitlines()
    assert lines[0] == "ImageId, EncodedPixels"
    ids = [line.split(",")[0] for line in lines[1:]]
    codes = [line.split(",", 1)[1] for line in lines[1:]]
    assert all(re.fullmatch(r"1\.2\.276\.0\.7230010\.3\.1\.4\.8323329\.\d+\.\d{10}\.\d+", i) for i in ids)
    assert " -1" in codes and all(c == " -1" or re.fullmatch(r"( \d+ \d+)+", c) for c in codes)
    assert pd.Series(ids).value_counts().max() > 1  # several mask rows for one image
    share = len({i for i, c in zip(ids, codes) if c != " -1"}) / len(set(ids))
    assert 0.15 < share < 0.45
    files = sorted((siim_root / "dicom-images-train").rglob("*.dcm"))
    assert sorted(p.stem for p in files) == sorted(set(ids))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    for path, h in zip(files, headers):
        rel = path.relative_to(siim_root / "dicom-images-train").parts
        assert rel == (h.StudyInstanceUID, h.SeriesInstanceUID, f"{h.SOPInstanceUID}.dcm")
    assert {h.PhotometricInterpretation for h in headers} == {"MONOCHROME1", "MONOCHROME2"}
    assert {h.BitsStored for h in headers} == {8, 12}


def test_siim_masks_follow_the_drawing(siim_root):
    rles = pd.read_csv(siim_root / "train-rle.csv")
    for i in range(N_SIIM):
        case = siim_case(SEED, i)
        rows = rles.loc[rles["ImageId"] == case.uids[2], " EncodedPixels"]
        decoded = [rle_decode(code, SIZE, SIZE) for code in rows]
        union = np.logical_or.reduce(decoded)
        assert (union == case.mask).all()
        assert ("Pneumothorax" in case.patient.findings) == bool(case.mask.any())
        if len(decoded) > 1:
            assert not np.logical_and(decoded[0], decoded[1]).any()  # components, not copies


def test_siim_adapter_reads_one_row_per_image(siim_root):
    manifest = Siim(siim_root).read()
    rles = pd.read_csv(siim_root / "train-rle.csv")
    assert len(manifest) == N_SIIM == rles["ImageId"].nunique()  # not one row per mask component
    assert list(manifest.columns) == ["sample_id", "patient_id", "image_path", "split", "Pneumothorax"]
    positive = {siim_case(SEED, i).uids[2] for i in range(N_SIIM) if siim_case(SEED, i).mask.any()}
    assert set(manifest.loc[manifest["Pneumothorax"] == 1.0, "sample_id"]) == positive
    assert set(manifest["Pneumothorax"]) == {0.0, 1.0}
    _assert_patient_disjoint(manifest)
    for row in manifest.itertuples():
        path = Path(row.image_path)
        assert path.is_file() and path.stem == row.sample_id and path.parent.parent.parent.name == "dicom-images-train"
    case = siim_case(SEED, 1)  # MONOCHROME1
    assert _corr(read_image(manifest.set_index("sample_id").loc[case.uids[2], "image_path"]), case.pixels) > 0.98


def _siim_csv(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "siim"
    root.mkdir()
    (root / "train-rle.csv").write_text(text)
    return root


def test_siim_tolerates_both_spellings_and_missing_images(tmp_path):
    root = _siim_csv(tmp_path, "ImageId,EncodedPixels\n1.2.3,-1\n1.2.4,5 6\n1.2.4,-1\n1.2.5, -1\n")
    (root / "dicom-images-train" / "s" / "r").mkdir(parents=True)
    (root / "dicom-images-train" / "s" / "r" / "1.2.5.dcm").write_bytes(b"")
    manifest = Siim(root).read()
    assert manifest[["sample_id", "Pneumothorax"]].values.tolist() == [["1.2.3", 0.0], ["1.2.4", 1.0], ["1.2.5", 0.0]]
    assert manifest["image_path"].tolist() == [str(root / "dicom-images-train" / "1.2.3.dcm"),
                                               str(root / "dicom-images-train" / "1.2.4.dcm"),
                                               str(root / "dicom-images-train" / "s" / "r" / "1.2.5.dcm")]


@pytest.mark.parametrize("text,message", [
    ("ImageId, Mask\n1.2.3, -1\n", r"missing column\(s\) 'EncodedPixels'"),
    ("ImageId, EncodedPixels\n1.2.3, -1\n1.2.4, 5 6 7\n", r"line 3: .*'1\.2\.4'"),
    ("ImageId, EncodedPixels\n1.2.3, -1\n1.2.4, 0\n", r"line 3: .*'0'"),
    ("ImageId, EncodedPixels\n1.2.3, yes\n", r"line 2: .*'yes'"),
    ("ImageId, EncodedPixels\n1.2.3,\n", r"line 2: "),
])
def test_siim_bad_rows_name_file_and_line(tmp_path, text, message):
    root = _siim_csv(tmp_path, text)
    with pytest.raises(UserError, match=re.escape(str(root / "train-rle.csv")) + ".*" + message):
        Siim(root).read()


def test_siim_wrong_root(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Siim(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"has none of train-rle\.csv"):
        Siim(tmp_path).read()
