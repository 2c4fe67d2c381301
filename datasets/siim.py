"""SIIM-ACR Pneumothorax (Kaggle 2019): `train-rle.csv` and DICOMs nested by study and series.

`train-rle.csv` has a row per mask component: an image with a two-part pneumothorax has two rows, a
negative image one row of `-1`. Its header is `ImageId, EncodedPixels`, so pandas would name the second
column " EncodedPixels" and read negatives as " -1"; both spellings are accepted.
Classification label (as GLoRIA/MGCA): Pneumothorax = 1 when any of the image's rows has a mask.

One manifest row per ImageId. GLoRIA/MGCA split the CSV's rows, which can put one image in two splits;
here the split is a patient hash split (70/15/15 by default) over ImageIds. The CSV names no patient, and
reading the PatientID of every DICOM would defeat metadata-only roots, so each image is its own patient.
Images are found by walking `images_dir` once (`<StudyUID>/<SeriesUID>/<ImageId>.dcm`); an ImageId without
a file gets `<images_dir>/<ImageId>.dcm`, which the harness then counts as missing.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.core.errors import UserError
from bench.core.lazy import lazy_module
from bench.core.registry import register_adapter
from bench.data.adapter import Adapter, Synthetic, finding_task, fraction_setting, hash_split, read_csv, require_columns
from bench.data.rle import RLE_PATTERN, rle_decode

np = lazy_module("numpy")
pd = lazy_module("pandas")

LABEL = "Pneumothorax"


@register_adapter
class Siim(Adapter):
    name = "siim"
    task = finding_task([LABEL], "auc")
    provides = frozenset({"masks"})
    description = "SIIM-ACR Pneumothorax: binary pneumothorax classification from DICOMs (AUC)"
    defaults = {"images_dir": "dicom-images-train", "val_fraction": 0.15, "test_fraction": 0.15}  # root: .../siim-acr-pneumothorax
    synthetic = Synthetic("siim-acr-pneumothorax", {"tiny": 80, "small": 2600, "medium": 6000},  # images, 60% test
                          "bench.data.synth.dicom_writers:write_siim")

    def read(self, with_reports: bool = True) -> pd.DataFrame:
        path = self.require("train-rle.csv")
        # skipinitialspace turns " EncodedPixels" and " -1" into the unspaced spellings
        df = read_csv(path, dtype=str, skipinitialspace=True, keep_default_na=False)
        df.columns = df.columns.str.strip()
        require_columns(df, ["ImageId", "EncodedPixels"], path)
        image_ids, rle = df["ImageId"].str.strip(), df["EncodedPixels"].str.strip()
        bad = (image_ids == "") | ~rle.str.fullmatch(RLE_PATTERN)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(f"{path}: line {i + 2}: expected an ImageId and EncodedPixels of -1 or run-length "
                            f"pairs, got {df['ImageId'].iloc[i]!r}, {df['EncodedPixels'].iloc[i][:40]!r}")
        positive = (rle != "-1").groupby(image_ids, sort=False).any()
        self._codes = {str(k): list(v) for k, v in rle.groupby(image_ids, sort=False)}  # for finding_mask
        images_dir = self.root / str(self.cfg.get("images_dir", "dicom-images-train"))
        found = self._find_images(images_dir)
        ids = positive.index.to_numpy(dtype=str)
        return pd.DataFrame({
            "sample_id": ids,
            "patient_id": ids,
            "image_path": [found.get(i) or str(images_dir / f"{i}.dcm") for i in ids],
            "split": hash_split(ids, "siim", fraction_setting(self.cfg, "val_fraction", 0.15),
                                fraction_setting(self.cfg, "test_fraction", 0.15)),
            LABEL: positive.to_numpy(dtype=float),
        })

    def finding_mask(self, row: Mapping[str, Any]) -> np.ndarray | None:
        """The union of the image's RLE components (decoded column-major on the image file's own rows and
        columns, as the CSV codes them); all False for a `-1` image; None for an ImageId the CSV lacks."""
        from bench.data.finding_masks import image_shape, union  # numpy: not at import, `bench list` stays instant

        if not hasattr(self, "_codes"):
            self.read(with_reports=False)
        codes = self._codes.get(str(row["sample_id"]))
        if codes is None:
            return None
        height, width = image_shape(row["image_path"])
        try:
            return union((rle_decode(code, height, width) for code in codes), (height, width))
        except ValueError as exc:
            raise UserError(f"{self.root / 'train-rle.csv'}: ImageId {row['sample_id']}: {exc}") from None

    @staticmethod
    def _find_images(images_dir: Path) -> dict[str, str]:
        """ImageId -> path of every .dcm under `images_dir` (absent folder: none)."""
        out = {}
        for folder, _, files in os.walk(images_dir):
            for file in files:
                if file.endswith(".dcm"):
                    out[file[:-4]] = os.path.join(folder, file)
        return out
