import json

from conftest import TINY, TINY_FOLDER
from tests_support import bench_cli


def test_run_then_table_end_to_end(data_home, tmp_path):
    results = tmp_path / "results"
    run = bench_cli("run", "--method", "clip", "--results-dir", str(results), *TINY)
    assert run.returncode == 0, run.stderr
    assert "| clip" in run.stdout and "| random-init" in run.stdout
    records = sorted(results.glob("records/*/*.json"))
    assert len(records) == 20  # (clip, random-init) x (zero-shot, linear-probe) x five datasets
    recs = [json.loads(p.read_text()) for p in records]
    assert {r["dataset"] for r in recs} == {"chexpert", "rsna", "siim", "covidx", "nih"}
    probe = next(r for r in recs if r["protocol"] == "linear-probe")
    assert set(probe["splits"]["sha256"]) == {"train.txt", "val.txt", "test.txt"}
    rec = recs[0]
    for field in ("metrics", "per_class", "config", "config_hash", "git", "libraries", "device", "wall_time_s",
                  "splits", "checkpoint", "predictions_file", "pretrain_seed", "eval_seed", "fraction"):
        assert field in rec, field
    assert (records[0].parent / rec["predictions_file"]).exists()

    stamps = {p: p.stat().st_mtime_ns for p in records}
    again = bench_cli("run", "--method", "clip", "--results-dir", str(results), *TINY)
    assert again.returncode == 0, again.stderr
    assert {p: p.stat().st_mtime_ns for p in records} == stamps, "finished evaluations are skipped"

    table = bench_cli("table", "--metric", "auc", "--results-dir", str(results))
    assert table.returncode == 0 and "chexpert zero-shot" in table.stdout and "(n=1)" in table.stdout
    latex = bench_cli("table", "--format", "latex", "--results-dir", str(results))
    assert "\\begin{tabular}" in latex.stdout


def test_list_and_help():
    out = bench_cli("list")
    assert out.returncode == 0
    assert "clip: none, fixed-temperature, frozen-text" in out.stdout
    # every ablation with the keys it changes (diffed from the composed configs) and what follows from them
    assert "    fixed-temperature: method.learn_temperature true -> false\n" in out.stdout
    assert ("    no-attmim: method.image_masking.enabled true -> false, method.text_masking.decoder_image visible -> "
            "full\n      follows: with no patch hidden there are no visible patches") in out.stdout
    assert "    random-image-mask: method.image_masking.strategy attention -> random\n" in out.stdout
    assert "    random-text-mask: method.text_masking.strategy entity -> random-matched\n" in out.stdout
    assert "    no-entmlm: method.text_masking.enabled true -> false\n    no-prompts:" in out.stdout
    assert "chexpert" in out.stdout and "linear-probe" in out.stdout
    assert "--ablation" in bench_cli("run", "--help").stdout


def test_data_synth_and_throughput(data_home):
    root = data_home / TINY_FOLDER
    out = bench_cli("data", "synth", "--size", "tiny", "--out", str(root))
    assert out.returncode == 0, out.stderr
    assert f"nih        {root / 'ChestX-ray14'}" in out.stdout and len(out.stdout.splitlines()) == 7
    speed = bench_cli("data", "throughput", "rsna", "--root", str(root / "rsna-pneumonia-detection-challenge"),
                      "--limit", "20", "--image-size", "64")
    assert speed.returncode == 0, speed.stderr
    assert "rsna: 20 images at 64px, images/s: no cache" in speed.stdout and "from the cache" in speed.stdout
