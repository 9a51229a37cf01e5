import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from recsys.commands.eval import main as eval_main
from recsys.data.datamodule import CTRDataModule
from recsys.eval.metrics import rela_impr
from recsys.train.cli import run
from tests.conftest import ROOT, plain_ctr_metrics, write_dataset

CONFIG = ROOT / "configs" / "movielens" / "base.yaml"


def _fit(data: Path, logs: Path, *extra: str) -> Path:
    run(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--data.path",
            str(data),
            "--trainer.max_epochs",
            "2",
            "--trainer.logger.init_args.save_dir",
            str(logs),
            "--trainer.enable_progress_bar",
            "false",
            "--model.init_args.embedding",
            '{"dim": 8}',
            "--data.batch_size",
            "256",
            "--model.init_args.optimizer.init_args.lr",
            "0.01",
            *extra,
        ]
    )
    ckpts = sorted(logs.rglob("best.ckpt"))
    assert len(ckpts) == 1
    return ckpts[0]


def test_fit_then_eval_on_any_dataset_in_the_contract(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_dataset(tmp_path / "tiny")
    ckpt = _fit(data, tmp_path / "runs", "--seed_everything", "7")
    run_dir = ckpt.parent.parent
    config = yaml.safe_load((run_dir / "config.yaml").read_text())  # resolved config saved with the logs
    assert config["seed_everything"] == 7 and config["trainer"]["max_epochs"] == 2
    assert config["model"]["init_args"]["embedding"] == {"dim": 8}
    assert list(run_dir.glob("events.out.tfevents.*"))  # TensorBoard

    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"auc": 0.6, "gauc": 0.55}))
    out = tmp_path / "report"
    assert eval_main(["--ckpt", str(ckpt), "--out", str(out), "--baseline", str(baseline), "--bootstrap", "50"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == 600 and report["data"] == str(data)
    # the report's numbers are the metrics of its own predictions
    scored = pq.read_table(out / "predictions.parquet").to_pandas()
    expected = plain_ctr_metrics(scored["label"].to_numpy(), scored["prob"].to_numpy(), scored["group"].to_numpy())
    for key in ("auc", "gauc", "logloss"):
        assert report[key] == pytest.approx(expected[key])
        lo, hi = report["ci95"][key]
        assert lo <= report[key] <= hi
    assert report["auc"] > 0.7
    assert report["rela_impr_auc"] == pytest.approx(rela_impr(report["auc"], 0.6))
    md = (out / "report.md").read_text()
    assert "RelaImpr(AUC)" in md and "reliability.png" in md
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "[recsys eval] test (600 rows)" in capsys.readouterr().out

    # from the command line the process ends without the interpreter's teardown: what it wrote is whole
    shell = tmp_path / "report_shell"
    argv = ["recsys", "eval", "--ckpt", str(ckpt), "--out", str(shell), "--baseline", str(baseline)]
    argv += ["--bootstrap", "50"]
    code = f"import sys; from recsys.cli import main; sys.argv = {argv!r}; sys.exit(main())"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0 and "[recsys eval] test (600 rows)" in done.stdout, done.stderr[-2000:]
    timed = {"scoring_rows_per_s", "out"}  # (a speed, and where it went)
    shell_report = json.loads((shell / "report.json").read_text())
    assert {k: v for k, v in shell_report.items() if k not in timed} == {
        k: v for k, v in report.items() if k not in timed
    }
    assert pq.read_table(shell / "predictions.parquet").equals(pq.read_table(out / "predictions.parquet"))
    assert (shell / "report.md").read_text() == md.replace(str(out), str(shell))
    assert (shell / "reliability.png").read_bytes() == (out / "reliability.png").read_bytes()


def test_same_config_trains_on_a_dataset_with_other_features(tmp_path: Path) -> None:
    schema = """\
label: click
features:
  - {name: item, type: categorical}
  - {name: price, type: numeric}
"""
    data = write_dataset(tmp_path / "other", schema=schema)
    ckpt = _fit(data, tmp_path / "runs")
    from recsys.train.checkpoint import load_model

    model = load_model(str(ckpt))
    assert [c.name for c in model.embedding.bags.embedding_bag_configs()] == ["t_item"]
    assert model.dnn.layers[0].in_features == 8 + 1


def test_validate_test_and_predict_from_a_checkpoint(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "tiny")
    ckpt = _fit(data, tmp_path / "runs")
    common = [
        "--config",
        str(CONFIG),
        "--data.path",
        str(data),
        "--model.init_args.embedding",
        '{"dim": 8}',
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs2"),
        "--trainer.enable_progress_bar",
        "false",
        "--ckpt_path",
        str(ckpt),
    ]
    cli = run(["test", *common])
    test_auc = cli.trainer.callback_metrics["test/auc"].item()
    cli = run(["predict", *common, "--data.predict_split", "test"])
    predictions = list((tmp_path / "runs2").rglob("predictions.parquet"))
    assert len(predictions) == 1
    scored = pq.read_table(predictions[0]).to_pandas()
    assert len(scored) == 600
    assert plain_ctr_metrics(scored["label"].to_numpy(), scored["prob"].to_numpy(), scored["group"].to_numpy())[
        "auc"
    ] == pytest.approx(test_auc, abs=1e-6)


def test_eval_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert eval_main(["--ckpt", str(tmp_path / "missing.ckpt")]) == 2
    assert "missing.ckpt: checkpoint not found" in capsys.readouterr().err


def test_console_script_help_and_print_config() -> None:
    recsys = Path(sys.executable).parent / "recsys"
    out = subprocess.run([str(recsys), "--help"], capture_output=True, text=True, check=True).stdout
    assert "fit" in out and "eval" in out
    out = subprocess.run(
        [str(recsys), "fit", "--config", str(CONFIG), "--print_config"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    printed = yaml.safe_load(out)
    assert printed["model"]["class_path"] == "recsys.models.base.EmbeddingMLP"
    assert "features" not in printed["model"]["init_args"]  # linked from the data module
    shipped = yaml.safe_load(Path(CONFIG).read_text())["model"]["init_args"]["optimizer"]["init_args"]["lr"]
    assert np.isclose(printed["model"]["init_args"]["optimizer"]["init_args"]["lr"], shipped)


@pytest.mark.parametrize("model", ["base", "din", "dlrm"])
def test_every_kind_overlay_composes_with_every_model_config(tmp_path: Path, model: str) -> None:
    """The overlays of configs/embedding/ (but the retrain one, which needs a search) build and run with
    each full model config from the CLI, as `recsys fit --config MODEL --config KIND` would."""
    data = write_dataset(tmp_path / "tiny")
    batch = next(iter(CTRDataModule(str(data), batch_size=32).stream("train")))
    for overlay in ("hashed", "unified", "optembed_supernet"):
        cli = run(
            [
                "--config",
                str(ROOT / f"configs/movielens/{model}.yaml"),
                "--config",
                str(ROOT / f"configs/embedding/{overlay}.yaml"),
                "--data.path",
                str(data),
                "--trainer.logger",
                "false",
            ],
            subcommand=False,
        )
        expected = yaml.safe_load((ROOT / f"configs/embedding/{overlay}.yaml").read_text())["model"]["init_args"][
            "embedding"
        ]
        from recsys.embedding.spec import EmbeddingSpec

        # the overlay replaced the model config's block whole
        assert cli.model.embedding.spec == EmbeddingSpec.parse(expected, cli.model.schema)
        loss = cli.model.training_loss(batch)
        assert torch.isfinite(loss), (model, overlay)


def test_old_keys_and_bad_blocks_stop_with_one_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_dataset(tmp_path / "tiny")
    old = tmp_path / "old_unified.yaml"
    old.write_text("model:\n  init_args:\n    unified: {rows: 100, dim: 8}\n")
    cases = [
        (
            ["--config", str(old)],
            "model.init_args.unified is no longer a model argument; write embedding: {kind: unified",
        ),
        (["--model.init_args.embedding_dim", "8"], "write embedding: {dim: N}"),
        (
            ["--model.init_args.embedding", '{"kind": "hashed", "dim": 6, "rows": 10}'],
            "embedding.dim: width 6 is not a multiple of 4",
        ),
        (["--model.init_args.embedding", '{"features": {"nope": {}}}'], "embedding.features.nope: no feature 'nope'"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as stop:
            run(["fit", "--config", str(CONFIG), "--data.path", str(data), "--trainer.logger", "false", *extra])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err, err[-2000:]


def test_data_whose_content_differs_is_refused_and_an_identical_copy_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    import shutil

    import pyarrow as pa

    from recsys.export.exporter import export

    data = write_dataset(tmp_path / "tiny")
    ckpt = _fit(data, tmp_path / "runs")
    copy = tmp_path / "copy"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns("vocab"))  # new files, new times, same content
    assert eval_main(["--ckpt", str(ckpt), "--data", str(copy), "--out", str(tmp_path / "r1"), "--bootstrap", "0"]) == 0
    export(ckpt, tmp_path / "e", "fp32", data=copy, progress=False)
    capsys.readouterr()

    reordered = tmp_path / "reordered"  # the same ids, counted differently: the vocabulary is rebuilt in another order
    shutil.copytree(data, reordered, ignore=shutil.ignore_patterns("vocab"))
    train = reordered / "train" / "part-0.parquet"
    table = pq.read_table(train)
    rare = table.column("item").to_numpy()
    counts = np.bincount(rare)
    least = int(np.flatnonzero(counts)[np.argmin(counts[counts > 0])])
    extra = table.filter(pa.compute.equal(table.column("item"), least))
    pq.write_table(pa.concat_tables([table] + [extra] * 40), train)
    assert eval_main(["--ckpt", str(ckpt), "--data", str(reordered), "--out", str(tmp_path / "r2")]) == 2
    assert "differs from the data the model was trained on in the vocabulary of 'item'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the vocabulary of 'item'"):
        export(ckpt, tmp_path / "e2", "fp32", data=reordered, progress=False)
    with pytest.raises(Exception, match="the vocabulary of 'item'"):  # recsys test --ckpt_path on that data
        run(
            [
                "test",
                "--config",
                str(CONFIG),
                "--data.path",
                str(reordered),
                "--model.init_args.embedding",
                '{"dim": 8}',
                "--trainer.logger",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--ckpt_path",
                str(ckpt),
            ]
        )


def test_a_run_without_a_logger_writes_no_config_into_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_dataset(tmp_path / "tiny")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # Lightning's default log_dir without a logger
    run(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--data.path",
            str(data),
            "--trainer.logger",
            "false",
            "--trainer.callbacks",
            "[]",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "1",
            "--trainer.limit_val_batches",
            "1",
        ]
    )
    assert not (work / "config.yaml").exists(), sorted(p.name for p in work.iterdir())
    # nor does its summary point at logs that were never written (Lightning's log_dir is the working dir)
    assert "TensorBoard logs" not in caplog.text
