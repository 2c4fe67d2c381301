"""AttMIM's hit rate against ground-truth finding masks: the statistic, the mapping of masks onto the patch
grid, the datasets' ground truth (sidecars, SIIM's RLE, RSNA's boxes), the logging during pretraining (which
must not change training) and `bench mask --stats`."""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_FOLDER
from PIL import Image

from bench.cli import main
from bench.data.finding_masks import (
    COVERAGE_THRESHOLD,
    ground_truth_grid,
    on_finding,
    patch_coverage,
    read_sidecar,
    sidecar_mask,
    write_sidecar,
)
from bench.data.images import resize_and_pad
from bench.data.rle import rle_encode
from bench.modeling.masking import hit_rate, select_patches


def _grid(*patches: int, n: int = 16) -> torch.Tensor:
    row = torch.zeros(n, dtype=torch.bool)
    row[list(patches)] = True
    return row


def test_hit_rate_is_a_hand_count_on_a_planted_mask():
    """4x4 patches. Image 0: a finding on patches 0, 1, 4, 5 (the top-left 2x2); the mask hides the top row
    and patches 8, 9: 2 hits of 6. Image 1: a finding on patch 15; the mask hides 10..15: 1 hit of 6."""
    on = torch.stack([_grid(0, 1, 4, 5), _grid(15)])
    masked = torch.stack([_grid(0, 1, 2, 3, 8, 9), _grid(10, 11, 12, 13, 14, 15)])
    r = hit_rate(masked, on)
    assert (r.hits, r.hidden, r.images) == (3, 12, 2)
    assert r.hit_rate == 3 / 12
    assert r.finding_share == pytest.approx((4 + 1) / 32)  # the mean share of patches on a finding
    assert r.lift == pytest.approx((3 / 12) / (5 / 32))
    assert r.metrics("attmim_") == {"attmim_hit_rate": r.hit_rate, "attmim_finding_share": r.finding_share,
                                    "attmim_lift": r.lift}
    none = hit_rate(masked, torch.zeros_like(on))  # no finding anywhere: no lift to speak of
    assert none.hit_rate == 0.0 and none.finding_share == 0.0 and none.lift is None


def test_random_masks_have_a_lift_near_one_and_leave_the_global_stream_alone():
    on = torch.zeros(400, 64, dtype=torch.bool)
    on[:, :16] = True  # a quarter of every image
    state = torch.get_rng_state()
    mask = select_patches(None, 400, 64, 0.75, 1.0, 4, generator=torch.Generator().manual_seed(0))
    again = select_patches(None, 400, 64, 0.75, 1.0, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # a generator of its own: training's stream did not move
    assert torch.equal(mask.masked, again.masked)
    r = hit_rate(mask.masked, on)
    assert r.finding_share == 0.25 and r.lift == pytest.approx(1.0, abs=0.03)


def test_patch_coverage_after_resize_and_pad_is_a_hand_computation():
    # 64 rows x 32 columns to a 32 square: halved to 32 x 16, padded 8 columns left; 8-pixel patches, 4 x 4
    tall = np.zeros((64, 32), bool)
    tall[0:16, 0:8] = True  # -> square rows 0..7, columns 8..11: half of patch (0, 1)
    expected = np.zeros(16)
    expected[1] = 0.5
    assert np.array_equal(patch_coverage(tall, 32, 8), expected)
    # 32 rows x 64 columns: halved to 16 x 32, padded 8 rows on top; the right half -> patches (1|2, 2|3)
    wide = np.zeros((32, 64), bool)
    wide[:, 32:] = True
    assert np.flatnonzero(patch_coverage(wide, 32, 8) == 1.0).tolist() == [6, 7, 10, 11]
    assert np.flatnonzero(on_finding(wide, 32, 8)).tolist() == [6, 7, 10, 11]
    # a quarter of a patch is on a finding (the threshold itself), less is not
    quarter = np.zeros((32, 32), bool)
    quarter[0:4, 0:4] = True
    quarter[0:3, 8:11] = True
    assert COVERAGE_THRESHOLD == 0.25
    assert np.flatnonzero(on_finding(quarter, 32, 8)).tolist() == [0]


def test_patch_coverage_follows_the_images_own_resize():
    """Any shape and scale: a mask drawn as an image and put through resize_and_pad covers each patch as
    patch_coverage says (up to the 8-bit image's rounding and the box filter's edges)."""
    rng = np.random.default_rng(0)
    for shape in ((50, 30), (30, 77), (96, 96), (20, 13)):
        mask = np.zeros(shape, bool)
        r0, c0 = rng.integers(0, shape[0] // 2), rng.integers(0, shape[1] // 2)
        mask[r0:r0 + shape[0] // 3, c0:c0 + shape[1] // 2] = True
        square = resize_and_pad(mask.astype(np.uint8) * 255, 32).astype(float) / 255
        from_image = square.reshape(4, 8, 4, 8).mean((1, 3)).ravel()
        assert np.abs(patch_coverage(mask, 32, 8) - from_image).max() < 0.06, shape
        whole = resize_and_pad(np.full(shape, 255, np.uint8), 32).reshape(4, 8, 4, 8).mean((1, 3)).ravel() / 255
        assert np.abs(patch_coverage(np.ones(shape, bool), 32, 8) - whole).max() < 0.01, shape


def test_sidecars_are_ground_truth_and_their_absence_is_not(tmp_path):
    from bench.data.adapter import Adapter

    for name, shape in (("a", (40, 30)), ("b", (40, 30)), ("c", (40, 30))):
        Image.fromarray(np.zeros(shape, np.uint8)).save(tmp_path / f"{name}.png")
    effusion, nodule = np.zeros((40, 30), bool), np.zeros((40, 30), bool)
    effusion[30:, :10], nodule[5:8, 20:23] = True, True
    write_sidecar(tmp_path / "a.png", {"Pleural Effusion": effusion, "Nodule": nodule, "Edema": np.zeros((40, 30))})
    write_sidecar(tmp_path / "b.png", {})  # drawn without findings
    assert set(read_sidecar(tmp_path / "a.png")) == {"Pleural Effusion", "Nodule"}
    adapter = Adapter(tmp_path)
    assert np.array_equal(adapter.finding_mask({"image_path": str(tmp_path / "a.png")}), effusion | nodule)
    empty = adapter.finding_mask({"image_path": str(tmp_path / "b.png")})
    assert empty.shape == (40, 30) and not empty.any()  # ground truth that nothing is there
    assert sidecar_mask(tmp_path / "c.png") is None  # no sidecar: no ground truth
    kept, grid = ground_truth_grid(range(3), lambda i: sidecar_mask(tmp_path / f"{'abc'[i]}.png"), 16, 4)
    assert kept == [0, 1] and grid.shape == (2, 16) and grid[0].any() and not grid[1].any()


def _write_dicom(path, rows: int, cols: int, monochrome1: bool) -> None:
    from bench.data.synth.dicom_writers import write_dicom

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = (np.arange(rows * cols).reshape(rows, cols) % 200).astype(np.uint8)
    write_dicom(path, pixels, patient_id="p", sop_uid="1.2.3", study_uid="1.2.4", series_uid="1.2.5",
                monochrome1=monochrome1)


def test_siim_rle_and_rsna_boxes_map_to_the_right_patches(tmp_path):
    """A 32 x 16 image to a 16 square (4 x 4 patches of 4): halved, padded 4 columns left. The right half of the
    top half (rows 0..15, columns 8..15) fills patches 2 and 6; rows 24..31, columns 0..3 cover half of patch 13."""
    from bench.datasets.rsna import Rsna
    from bench.datasets.siim import Siim

    top, corner = np.zeros((32, 16), bool), np.zeros((32, 16), bool)
    top[0:16, 8:16], corner[24:32, 0:4] = True, True
    siim = tmp_path / "siim"
    for image_id, inverted in (("pos", True), ("neg", False)):
        _write_dicom(siim / "dicom-images-train" / "s" / "r" / f"{image_id}.dcm", 32, 16, inverted)
    # one row per component, column-major run lengths on the image's own size, as the real file
    (siim / "train-rle.csv").write_text(f"ImageId, EncodedPixels\npos, {rle_encode(top)}\npos, {rle_encode(corner)}\n"
                                        f"neg, -1\n")
    adapter = Siim(siim)
    manifest = adapter.read().set_index("sample_id")
    pos = {"sample_id": "pos", "image_path": manifest.loc["pos", "image_path"]}
    assert np.array_equal(adapter.finding_mask(pos), top | corner)
    assert np.flatnonzero(on_finding(adapter.finding_mask(pos), 16, 4)).tolist() == [2, 6, 13]
    assert not adapter.finding_mask({"sample_id": "neg", "image_path": manifest.loc["neg", "image_path"]}).any()
    assert adapter.finding_mask({"sample_id": "elsewhere", "image_path": "x.dcm"}) is None

    rsna = tmp_path / "rsna"
    for patient, inverted in (("p1", False), ("p2", True)):
        _write_dicom(rsna / "stage_2_train_images" / f"{patient}.dcm", 32, 16, inverted)
    (rsna / "stage_2_train_labels.csv").write_text(
        "patientId,x,y,width,height,Target\np1,8.0,0.0,8.0,16.0,1\np1,0.0,24.0,4.0,8.0,1\np2,,,,,0\n")
    adapter = Rsna(rsna)
    manifest = adapter.read().set_index("sample_id")
    mask = adapter.finding_mask({"sample_id": "p1", "image_path": manifest.loc["p1", "image_path"]})
    assert np.array_equal(mask, top | corner)
    assert np.flatnonzero(on_finding(mask, 16, 4)).tolist() == [2, 6, 13]
    assert not adapter.finding_mask({"sample_id": "p2", "image_path": manifest.loc["p2", "image_path"]}).any()


def test_the_probe_runs_in_eval_mode_without_gradient_and_restores_everything(tiny_cfg, tmp_path):
    """The trainer's `measure` hands back the modes and random streams it found, even to a monitor that
    draws from the global stream; `mask_probe` with a generator draws nothing from it at all."""
    from bench.experiment.pretraining import build_method
    from bench.train.trainer import Trainer

    cfg = tiny_cfg("mmclip", extra=("method.image_masking.hit_rate_every=null",))
    method = build_method(cfg, 0).train()
    method.text_tower.eval()  # a mixed state, as a frozen tower would leave it
    modes = [m.training for m in method.modules()]
    images = torch.randn(3, 1, 96, 96)
    seen = {}

    class Careless:
        every = 1

        def __call__(self, m):
            seen.update(training=m.training, grad=torch.is_grad_enabled(), draw=float(torch.rand(())))
            return {"value": float(m.mask_probe(images, ["Right pleural effusion."] * 3).sum())}

    state = torch.get_rng_state()
    assert Trainer(cfg.trainer, tmp_path, torch.device("cpu")).measure(method, Careless()) == {"value": 3 * 48}
    assert seen["training"] is False and seen["grad"] is False
    assert [m.training for m in method.modules()] == modes and torch.equal(torch.get_rng_state(), state)
    method.eval()
    masked = method.mask_probe(images, ["No pneumothorax."] * 3, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state) and masked.shape == (3, 64) and masked.sum(1).tolist() == [48] * 3


@pytest.fixture()
def mimic_with_sidecars(data_home, tmp_path):
    """A copy of the tiny MIMIC-CXR with a planted finding (the lower left quarter) in every image's sidecar,
    whatever the generator writes."""
    root = tmp_path / "mimic"
    shutil.copytree(data_home / TINY_FOLDER / "mimic-cxr-jpg", root)
    for image in root.rglob("*.jpg"):
        with Image.open(image) as im:
            width, height = im.size
        mask = np.zeros((height, width), bool)
        mask[height // 2:, : width // 2] = True
        write_sidecar(image, {"Planted": mask})
    return root


def test_logging_the_hit_rate_leaves_training_bit_identical(tiny_cfg, mimic_with_sidecars, tmp_path):
    from bench.core.results import ResultsStore
    from bench.experiment.pretraining import pretrain

    def train(every: int):
        cfg = tiny_cfg("mmclip", extra=(f"data.mimic-cxr.root={mimic_with_sidecars}", "trainer.budget.steps=3",
                                        f"method.image_masking.hit_rate_every={every}",
                                        "trainer.batch_size=8", "method.image_masking.hit_rate_images=8",
                                        f"results_dir={tmp_path / f'every-{every}'}"))
        _, final = pretrain(cfg, ResultsStore(cfg.results_dir), torch.device("cpu"))
        rows = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
        return torch.load(final, weights_only=False)["model"], rows

    off, off_rows = train(0)
    on, on_rows = train(1)  # measured after every step, so steps 2 and 3 train after a measurement
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)
    assert [set(r) & {"attmim_hit_rate", "attmim_lift"} for r in on_rows] == [{"attmim_hit_rate", "attmim_lift"}] * 3
    assert not any("attmim_hit_rate" in r for r in off_rows)
    logged = on_rows[1]
    assert 0.0 <= logged["attmim_hit_rate"] <= 1.0 and 0.0 < logged["attmim_finding_share"] < 0.5
    assert logged["attmim_lift"] == pytest.approx(logged["attmim_hit_rate"] / logged["attmim_finding_share"])
    assert [r["loss"] for r in on_rows] == [r["loss"] for r in off_rows]


def test_bench_mask_stats_on_the_tiny_siim(data_home, capsys):
    assert main(["mask", "--dataset", "siim", "--stats", "--limit", "12", "data.synthetic.size=tiny"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "untrained mmclip" in out[1]
    values = dict(line.split(": ") for line in out[-3:])
    assert set(values) == {"hit_rate", "finding_share", "lift"}
    assert 0.0 <= float(values["hit_rate"]) <= 1.0
    assert main(["mask", "--dataset", "siim", "--stats", "--limit", "12", "--json", "--report",
                 "Large right pneumothorax.", "data.synthetic.size=tiny"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == 12 and stats["texts"] == "--report" and stats["hidden_per_image"] == 48
    assert {"hit_rate", "finding_share", "lift", "images_with_finding", "coverage_threshold"} <= set(stats)


def test_bench_mask_stats_refuses_in_one_line(data_home, mimic_with_sidecars, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(mimic_with_sidecars, bare, ignore=shutil.ignore_patterns("*.findings.npz"))
    cases = [(["--dataset", "mimic-cxr", f"data.mimic-cxr.root={bare}"], "mimic-cxr: none of the"),
             (["--dataset", "no-such-set"], "unknown dataset 'no-such-set'"),
             ([], "--stats needs --dataset"),
             (["--dataset", "siim", "--ablation", "no-attmim"], "no image masking to measure")]
    for extra, message in cases:
        assert main(["mask", "--stats", *extra, "data.synthetic.size=tiny"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
