"""The benchmark scripts stay runnable: tiny settings here, real figures on a GPU (see README)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_throughput_small_runs_and_reports_consistent_figures(tmp_path):
    import json

    import throughput

    res = throughput.main(["--small", "--out", str(tmp_path / "t.json")])
    assert res["melafast_train_img_s"] > 0 and res["pure_loop_img_s"] > 0
    assert res["ratio"] == pytest.approx(res["melafast_train_img_s"] / res["pure_loop_img_s"], rel=0.01)
    assert res["melafast_tta8_img_s"] > 0 and res["pure_inference_img_s"] > 0
    assert res["tta8_ratio"] == pytest.approx(res["melafast_tta8_img_s"] * 8 / res["pure_inference_img_s"], rel=0.01)
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


def test_profile_epoch_phases_add_up():
    import profile_epoch

    res = profile_epoch.main(["--small"])
    assert res["batches"] == 4 and set(res["share"]) == set(profile_epoch.PHASES)
    assert sum(res["share"].values()) == pytest.approx(1, abs=0.01)
    assert res["ms_per_batch"]["forward"] > 0 and res["ms_per_batch"]["backward"] > 0
    per_batch = sum(res["ms_per_batch"].values())
    assert res["img_s"] == pytest.approx(1000 * 16 / per_batch, rel=0.02)


def test_quality_small_runs_all_five_recipes_on_the_same_folds():
    from conftest import HAM, LITE0

    if not (HAM.is_dir() and LITE0.is_file()):
        pytest.skip("../shared data or weights not present")
    import quality

    res = quality.main(["--small"])
    assert list(res["recipes"]) == list(quality.RECIPES)
    assert 150 <= res["images"] <= 250 and res["melanomas"] >= 10
    for name, r in res["recipes"].items():
        assert 0 <= r["oof_auc"] <= 1 and r["seconds"] > 0, name
