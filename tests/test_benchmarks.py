"""The benchmark scripts stay runnable: tiny settings here, real figures on a GPU (see README)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_throughput_small_times_every_requested_image(tmp_path):
    import json

    import throughput

    res = throughput.main(["--small", "--out", str(tmp_path / "t.json")])
    # the timed epoch trained on every requested image (64, in batches of 16) and TTA predicted each image once
    # (the 64 training images and the 16 validation ones), counted by the script's callbacks, not by arithmetic
    assert res["melafast_images_timed"] == 64 and res["melafast_tta_images"] == 80
    assert res["melafast_train_img_s"] > 0 and res["pure_loop_img_s"] > 0 and res["pure_inference_img_s"] > 0
    # the pure loop on device tensors is the ceiling: a timer that missed part of melafast's epoch would beat it
    assert 0 < res["ratio"] < 1.5
    assert json.loads((tmp_path / "t.json").read_text()) == res


def test_data_speed_reads_a_competition_sized_table():
    import data_speed

    res = data_speed.main()
    assert res["rows"] == 33_126 and res["total_s"] > 0


def test_cpu_data_small_resizes_and_feeds():
    import cpu_data

    res = cpu_data.main(["--small"])
    assert res["prepare_img_s_per_core"] > 0 and res["prepare_img_s_all_cores"] > 0
    assert res["pipeline_img_s"] > 0 and res["pipeline_without_batch_augment_img_s"] > 0 and res["pipeline_batches"] >= 1


def test_profile_epoch_accounts_for_the_training_batches():
    import profile_epoch

    res = profile_epoch.main(["--small"])
    assert res["batches"] == 4 and set(res["share"]) == set(profile_epoch.PHASES)  # training batches only: 64 / 16
    assert all(res["ms_per_batch"][k] > 0 for k in ("forward", "backward", "step"))
    # the phases are laps of one clock inside the fit: they cannot add up to more than the fit's own wall time,
    # and they cover most of it (the rest is the one validation batch and fastai's epoch bookkeeping)
    assert 0.25 * res["fit_wall_s"] < res["profiled_s"] <= res["fit_wall_s"]


def test_quality_small_holds_out_lesions_and_repeats_seeds():
    from conftest import HAM, LITE0

    if not (HAM.is_dir() and LITE0.is_file()):
        pytest.skip("../shared data or weights not present")
    import quality

    from melafast.data import load_competition

    res = quality.main(["--small", "--fresh-check"])
    rows = [row for r in quality.RECIPES for row in quality.ROWS[r]]
    assert list(res["recipes"]) == rows and res["seeds"] == [42, 43]
    assert 120 <= res["cv_images"] <= 200 and res["cv_melanomas"] >= 10
    # the held-out part: whole lesions, 20% of them, of which --small scores about 120 images; melanomas at about
    # their share, and none of its lesions in the cross-validation part
    full, _ = load_competition(quality.SHARED / "data" / "ham10000")
    rest, held = quality.split_holdout(full, 0.2, 0)
    hold = quality._subset(held, quality.SMALL_HOLDOUT_IMAGES, seed=0)
    assert res["holdout_images"] == len(hold) and not set(hold["patient_id"]) & set(rest["patient_id"])
    assert abs(held["patient_id"].nunique() / full["patient_id"].nunique() - 0.2) < 0.01
    assert abs(len(hold) - quality.SMALL_HOLDOUT_IMAGES) < 20 and set(hold["patient_id"]) <= set(held["patient_id"])
    assert abs(hold["target"].mean() - full["target"].mean()) < 0.02
    for name, r in res["recipes"].items():
        seeds = r["per_seed"]
        assert [s["seed"] for s in seeds] == [42, 43], name
        for s in seeds:
            assert 0 <= s["oof"] <= 1 and 0 <= s["holdout"] <= 1 and 0 <= s["holdout_single"] <= 1, name
            assert 0 <= s["oof_pauc"] <= 0.2 and 0 <= s["holdout_pauc"] <= 0.2, name  # pAUC above 80% TPR
    # the single-model check of the melafast recipes: each fold model alone on three sets, all real AUCs
    for name in ("melafast_image", "melafast_meta_tta", "melafast_best"):
        for s in res["recipes"][name]["per_seed"]:
            assert all(0 <= s[f"single_tta1_{k}"] <= 1 for k in ("valid", "holdout", "fresh")), name
    assert "single_tta1_fresh" not in res["recipes"]["plain_fastai"]["per_seed"][0]
    # other seeds, other folds: the trained recipes' OOF predictions differ between seeds
    for name in ("plain_fastai", "melafast_image", "melafast_meta_tta"):
        assert len({s["oof"] for s in res["recipes"][name]["per_seed"]}) == 2, name
    # pretrained features + logistic regression find melanomas even at 48 px: a script that misaligned images,
    # labels or held-out rows would score about 0.5
    assert res["recipes"]["frozen_logreg"]["summary"]["holdout"]["mean"] > 0.6
    # the recipes with metadata are also scored with every metadata field blanked, on both sets
    for name in ("melafast_meta_tta", "melafast_best"):
        for s in res["recipes"][name]["per_seed"]:
            assert 0 <= s["oof_blank"] <= 1 and 0 <= s["holdout_blank"] <= 1, name
    assert "holdout_blank" not in res["recipes"]["melafast_image"]["per_seed"][0]
    # and with each pattern of missing fields a user can bring, from the same image features
    fields = ("age_approx", "sex", "anatom_site_general_challenge")
    for name in ("melafast_meta_tta", "melafast_best"):
        for s in res["recipes"][name]["per_seed"]:
            assert all(0 <= s[f"holdout_{how}_{c}"] <= 1 for how in ("without", "only") for c in fields), name
    table, check, blank, *patterns, points = quality.markdown_table([res]).split("\n\n")
    assert len(patterns) == 2 and all(len(p.splitlines()) == 2 + 8 for p in patterns)  # all, 3 without, 3 only, none
    assert all(p.splitlines()[-1].startswith("| no field (image head) |") and p.endswith("| 0.000 ± 0.000 |")
               for p in patterns)
    assert len(table.splitlines()) == 2 + len(rows) and all(f"| {name} | 2 |" in table for name in rows)
    pauc = res["recipes"]["frozen_logreg"]["summary"]["holdout_pauc"]
    assert table.splitlines()[2].endswith(f"| {pauc['mean']:.3f} ± {pauc['sd']:.3f} |")
    assert len(check.splitlines()) == 2 + 3  # the three melafast recipes' single-model check
    assert len(blank.splitlines()) == 2 + 2  # the two recipes with metadata, with and without it
    # the melafast recipes save the operating point "sensitivity >= 90%" and apply it to the held-out part as
    # predict does (the fold models' vote), beside the fold mean against the same threshold
    assert len(points.splitlines()) == 2 + 3
    for name in ("melafast_image", "melafast_meta_tta", "melafast_best"):
        for s in res["recipes"][name]["per_seed"]:
            assert 0 < s["op_holdout_sens"] <= 1 and 0 <= s["op_holdout_spec"] <= 1, name
            assert 0 < s["op_crossfit_sens"] <= 1 and 0 <= s["op_holdout_sens_mean"] <= 1, name


def test_serve_load_answers_every_request(make_run, sample_dir, tmp_path):
    import serve_load

    res = serve_load.main(["--run", str(make_run(tta=2)), "--images", str(sample_dir / "jpeg" / "test"), "--limit", "4",
                           "--clients", "3", "--seconds", "4", "--hostile", "3", "--out", str(tmp_path / "s.json")])
    assert res["requests"] == res["answered"] > 10 and res["lost"] == 0 and res["wrong_status"] == 0
    assert res["hostile"] >= 3 and {"200", "400", "403", "413"} <= set(res["by_status"])  # each kind met its answer
    assert res["max_diff_under_load"] == 0.0 and res["predictions_per_s"] > 0  # no request saw another's image


def test_onnx_speed_times_the_same_predictions(tiny_run, sample_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx_speed

    res = onnx_speed.main(["--run", str(tiny_run), "--images", str(sample_dir / "jpeg" / "test"), "--repeats", "1",
                           "--meta", str(sample_dir / "test.csv"), "--out", str(tmp_path / "s.json")])
    assert res["images"] == 16 and res["models"] == 2 and res["max_abs_diff"] < 1e-4
    assert res["torch_img_s"] > 0 and res["onnx_img_s"] > 0 and res["speedup"] == round(res["torch_s"] / res["onnx_s"], 2)


def test_store_speed_reads_the_same_images_both_ways(tmp_path):
    import store_speed

    res = store_speed.main(["--images", "40", "--size", "32", "--repeats", "1", "--out", str(tmp_path / "s.json")])
    if not res:
        pytest.skip("../shared/data/ham10000 not present")
    assert res["images"] == 40 and res["folder_img_s"] > 0 and res["store_img_s"] > 0


def test_quality_resample_gives_each_seed_its_own_cv_lesions():
    from conftest import HAM

    if not HAM.is_dir():
        pytest.skip("../shared data not present")
    from types import SimpleNamespace

    import quality

    from melafast.data import load_competition

    full, _ = load_competition(quality.SHARED / "data" / "ham10000")
    rest, hold = quality.split_holdout(full, 0.2, 0)
    a = SimpleNamespace(images=600, fresh_check=False, small=False, holdout_seed=0, _features="stale")
    parts = [quality._cv_part(rest, hold, a, subset_seed=s, n_fresh=300) for s in (42, 43)]
    lesions = [set(p["patient_id"]) for p in parts]
    assert lesions[0] != lesions[1] and not (lesions[0] | lesions[1]) & set(hold["patient_id"])
    for p, les in zip(parts, lesions):  # whole lesions, about the size asked, melanomas at about their share
        assert set(rest[rest["patient_id"].isin(les)]["image_name"]) == set(p["image_name"])
        assert abs(len(p) - 600) < 40 and abs(p["target"].mean() - full["target"].mean()) < 0.03
    # what depends on the CV part follows the last one drawn: fresh images outside it, features to pool again
    assert not set(a.op_fresh["patient_id"]) & lesions[1] and not hasattr(a, "_features")
    assert len(a.everything) == len(parts[1]) + len(hold)


def test_quality_pairs_blanked_and_image_only_by_seed():
    import quality

    per_seed = {"melafast_image_tta": [dict(seed=42, oof=0.80, holdout=0.85), dict(seed=43, oof=0.70, holdout=0.80)],
                "melafast_meta_tta": [dict(seed=43, oof_blank=0.71, holdout_blank=0.83),
                                      dict(seed=42, oof_blank=0.82, holdout_blank=0.84)]}
    paired = quality.blank_vs_image(per_seed)
    assert paired["holdout"]["per_seed"] == [0.03, -0.01] and paired["holdout"]["mean"] == 0.01
    assert paired["oof"]["per_seed"] == [0.01, 0.02] and paired["oof"]["sd"] == pytest.approx(0.0071, abs=1e-4)
    assert quality.blank_vs_image({"melafast_meta_tta": per_seed["melafast_meta_tta"]}) is None
    assert "+0.010 ± 0.028 (+0.030, -0.010)" in quality.markdown_table([dict(recipes={}, blank_vs_image=paired)])


def test_dedup_benchmark_finds_every_resized_copy(capsys):
    "benchmarks/dedup.py on a few hundred HAM10000 images: its tables, and resized copies found at the default."
    from conftest import HAM

    if not (HAM / "train.csv").is_file():
        pytest.skip("../shared/data/ham10000 not present")
    import dedup

    assert dedup.main(["--images", "300", "--copies", "20", "--distances", "24", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "300 images" in out and "| 24 | 20 (100%) |" in out


def test_cross_site_samples_whole_lesions_and_tables_the_seeds():
    import cross_site
    import pandas as pd

    df = pd.DataFrame({"patient_id": [f"L{i // 3}" for i in range(300)], "target": [int(i % 30 < 3) for i in range(300)]})
    part = cross_site.sample(df, 90, seed=0)
    assert part.groupby("patient_id").size().eq(3).all()  # whole lesions
    assert 60 <= len(part) <= 120 and part["target"].sum() > 0
    rows = pd.DataFrame([dict(seed=s, constancy=c, oof=0.8 - 0.04 * bool(c), oof_no_meta=0.8, site=0.6 + s / 100,
                              site_no_meta=0.6, gap=0.2, meta_cost=0.0) for s in range(3) for c in (0, 6)])
    md = cross_site.table(rows)
    assert "| off | 3 | 0.800 ± 0.000" in md and "| p=6 minus off (paired by seed) | 3 | -0.040 ± 0.000" in md


def test_store_scale_generates_reads_and_measures_memory(tmp_path, monkeypatch):
    import hashlib

    import store_scale

    monkeypatch.setenv("MELAFAST_CACHE", str(tmp_path / "cache"))
    res = store_scale.main(["--n", "200", "--reads", "60", "--size", "32", "--workers", "0", "--repeats", "1",
                            "--work", str(tmp_path / "w")])
    files = sorted((tmp_path / "w" / "images").glob("*.jpg"))
    assert len(files) == 200 and len({hashlib.md5(f.read_bytes()).hexdigest() for f in files}) == 200
    assert res["images"] == 200 and res["index_bytes"] == 200 * (12 + 8 + 8) and res["table_mb"] > 0 and res["dls_peak_mb"] > 0
    (row,) = res["read"]
    assert row["workers"] == 0 and row["folder_img_s"] > 0 and row["store_img_s"] > 0
    assert row["store_vs_folder"] == round(row["store_img_s"] / row["folder_img_s"], 2)


def test_stack_scale_cross_fits_a_synthetic_table():
    import stack_scale

    res = stack_scale.main(["--rows", "3000", "--columns", "3", "--model", "logistic", "--positive-rate", "0.05"])
    assert res["rows"] == 3000 and res["rounds"] == [None] * 5 and len(res["weights"]) == 5 and res["seconds"] > 0
    assert 0.5 < res["image_auc"] < res["stack_auc"] <= 1  # the informative column is used
