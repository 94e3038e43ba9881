"""Aurora-Bench configs: the real one stops before loading anything when its inputs are absent; the tiny one runs
SFT → SWIRL → test end to end on the converted 28-pair sample."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from datamodules.convert import convert_aurora
from swirl_vl.cli import main
from swirl_vl.models.tiny_vlm import build_tiny_llava

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "aurora-bench-sample"
REAL = str(REPO / "configs" / "aurorabench.yaml")
TINY = str(REPO / "configs" / "aurorabench_tiny.yaml")
TASKS = {"magicbrush", "ag", "something", "whatsup", "kubric"}
TARGET_FREE = {"clevr", "emu", "epic"}  # the whole benchmark's tasks without a target image


def _swirl(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "swirl_vl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _missing(args: list[str]) -> str:
    """The message the CLI exits with."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return str(exit_info.value.code)


def test_real_config_fails_fast_with_what_to_download_and_convert(tmp_path: Path) -> None:
    # From an empty folder, so that the config's relative paths exist nowhere, whatever lies in the checkout.
    start = time.perf_counter()
    proc = _swirl("fit", "--config", REAL, cwd=tmp_path, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert "missing inputs, nothing was run" in err and "Traceback" not in err, err[-3000:]
    assert "hf download timbrooks/instruct-pix2pix --local-dir checkpoints/instruct-pix2pix" in err
    assert "hf download Qwen/Qwen2.5-VL-3B-Instruct --local-dir checkpoints/Qwen2.5-VL-3B-Instruct" in err
    assert "--json TRAIN.json --out data/aurora/labelled` (never the benchmark's test.json)" in err
    assert "datamodules.convert video --src VIDEOS --out data/aurora/unlabelled`" in err
    assert "--json AURORA/test.json --out data/aurora/test`" in err
    assert "datamodules.sprites" not in err, "a real config is never pointed at the synthetic world"
    for split in ("labelled", "unlabelled", "val", "test"):  # fit evaluates on the test split at each boundary
        assert f"split '{split}': pattern" in err, split
    assert seconds < 60, f"took {seconds:.0f} s: something heavy ran before the check"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be written before the check"


def test_real_config_names_only_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fwm = tmp_path / "checkpoints" / "instruct-pix2pix"
    fwm.mkdir(parents=True)
    assert "timbrooks/instruct-pix2pix" in _missing(["fit", "--config", REAL])  # a folder without model_index.json
    (fwm / "model_index.json").write_text("{}")
    message = _missing(["test", "--config", REAL])
    assert "timbrooks" not in message and "Qwen/Qwen2.5-VL-3B-Instruct" in message
    # `test` reads the test split only.
    assert "data/aurora/test" in message and "labelled" not in message


def test_tiny_config_on_a_missing_root_says_what_to_convert(tmp_path: Path) -> None:
    message = _missing(["fit", "--config", TINY, "--data.root", str(tmp_path / "nowhere")])
    assert f"--out {tmp_path / 'nowhere'}`" in message and "split 'labelled'" in message
    assert "instruct-pix2pix" not in message  # the tiny models are built, not downloaded


def _whole_benchmark(path: Path) -> Path:
    """The sample's 28 entries plus two of each target-free task, written as the benchmark's test.json writes them
    (no "output"; "id" or "type" on some); their sources are sample photos, as the sample holds no clevr/emu/epic."""
    entries = json.loads((SAMPLE / "test.json").read_text())
    inputs = [e["input"] for e in entries]
    extra = [
        {"id": "005422", "instruction": "the tiny yellow cylinder turns brown", "input": inputs[0], "task": "clevr"},
        {
            "id": "000031",
            "instruction": "change the large green matte ball to red",
            "input": inputs[5],
            "task": "clevr",
        },
        {"instruction": "Make it into Conceptual Art.", "input": inputs[10], "type": "style", "task": "emu"},
        {"instruction": "Make the photo seem taken at a picnic.", "input": inputs[15], "type": "global", "task": "emu"},
        {"input": inputs[20], "instruction": "Turn on the water tab with the left hand", "task": "epic"},
        {"input": inputs[25], "instruction": "Move the hand slightly up", "task": "epic"},
    ]
    path.write_text(json.dumps(entries + extra))
    return path


@pytest.mark.skipif(not (SAMPLE / "test.json").exists(), reason=f"Aurora-Bench sample not at {SAMPLE}")
def test_tiny_config_fits_tests_and_predicts_on_all_eight_tasks(tmp_path: Path) -> None:
    data = tmp_path / "data"
    # Stored at 32 px: the training streams re-read the shard every few batches, and decoding the photos dominates.
    converted = convert_aurora(SAMPLE, _whole_benchmark(tmp_path / "bench.json"), data, image_size=32)
    assert (converted.written, converted.target_free) == (34, 6)
    args = [
        "--config",
        TINY,
        "--data.root",
        str(data),
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--model.init_args.fwm.init_args.model.init_args.path",
        str(tmp_path / "models" / "fwm"),
        "--model.init_args.idm.init_args.model.init_args.path",
        str(tmp_path / "models" / "idm"),
        "--trainer.val_check_interval",
        "4",
        "--schedule.sft_steps",
        "4",
        "--schedule.phase1_steps",
        "2",
        "--schedule.phase2_steps",
        "2",
        "--model.init_args.idm.init_args.model.init_args.max_new_tokens",
        "8",
        "--data.eval_batch_size",
        "8",  # validation and boundary evaluations see one batch of 8; `test` still sees all 28 pairs
    ]
    fit = _swirl("fit", *args, cwd=tmp_path)
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-5000:]
    # Training and validation read the same shards and skip the target-free pairs, counted.
    assert "skipped (no_target)" in fit.stderr and "(no_target " in fit.stdout + fit.stderr
    run = tmp_path / "runs" / "aurorabench_tiny" / "version_0"
    table = json.loads((run / "swirl_metrics.json").read_text())
    assert [row["after"] for row in table] == ["sft", "iteration_1"]
    assert {"fwm_l1", "fwm_psnr", "fwm_ssim", "idm_exact"} <= set(table[0])
    phases = json.loads((run / "swirl_phases.json").read_text())
    assert [(p["stage"], p["steps"]) for p in phases] == [("sft", 4), ("phase1", 2), ("phase2", 2)]
    assert (run / "pretrained" / "iteration_1_phase2" / "idm" / "config.json").exists()

    # `test` with a VLM judge (a tiny random one: its answers are mostly unreadable, which the report counts).
    judge = {"class_path": "swirl_vl.eval.judge.VLMJudge", "init_args": {"path": str(tmp_path / "judge")}}
    build_tiny_llava(tmp_path / "judge", seed=0, image_size=32)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    test = _swirl(
        "test", *args, "--model.init_args.fwm.init_args.judge", json.dumps(judge), "--ckpt_path", ckpt, cwd=tmp_path
    )
    assert test.returncode == 0, test.stdout[-3000:] + test.stderr[-5000:]
    assert "test/fwm_psnr" in test.stdout and "test/idm_exact" in test.stdout
    report = json.loads((run / "test_metrics.json").read_text())  # test logs into the run it tests
    rows = {row["task"]: row for row in report["rows"]}
    assert set(rows) == {"all"} | TASKS | TARGET_FREE
    assert rows["all"]["pairs"] == 34 and sum(rows[t]["pairs"] for t in TASKS | TARGET_FREE) == 34
    assert all(0 <= rows[t]["fwm_l1"] <= 1 and 0 <= rows[t]["fwm_change_l1"] <= 1 for t in TASKS)
    assert all(0 <= rows[t]["judge_unparsed"] <= 1 for t in rows)
    assert report["counts"]["all"]["judge_unparsed"] == 34  # the judge sees every edit, target or not
    for task in TARGET_FREE:  # the metrics that need no target, and none that would
        assert rows[task]["pairs"] == 2 and 0 < rows[task]["fwm_change_l1"] <= 1, rows[task]
        assert not {"fwm_l1", "fwm_psnr", "idm_exact", "cycle_l1", "true_change_l1"} & set(rows[task]), rows[task]
    assert report["counts"]["all"]["fwm_l1"] == report["counts"]["all"]["idm_exact"] == 28
    assert report["skipped"] == {}  # the test split keeps the target-free pairs
    header = (run / "test_metrics.md").read_text().splitlines()[0]
    assert all(f" {task} |" in header for task in TASKS | TARGET_FREE), header

    # predict: every pair's ŷ; a target-free pair has no IDM action and no target metrics (null, not NaN).
    out = tmp_path / "predictions"
    main(["predict", *args, "--ckpt_path", ckpt, "--predictions.output_dir", str(out)])  # in this process: no start-up
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 34 and all((out / row["y_hat"]).exists() for row in index)
    free = [row for row in index if row["task"] in TARGET_FREE]
    assert len(free) == 6 and not any(row["has_target"] for row in free)
    assert all(row["idm_action"] is None and row["fwm_l1"] is None and row["fwm_change_l1"] > 0 for row in free)
    assert all(row["has_target"] and isinstance(row["fwm_l1"], float) for row in index if row not in free)
    assert (out / "sheet.html").read_text().count("<i>no target</i>") == 6
