import json

import pytest
from mlflow import MlflowClient
from torch import nn
from typer.testing import CliRunner

from cifarx import Architecture, hookimpl
from cifarx.cli import app

runner = CliRunner()
QUICK = ["--iters", "20", "--batch-size", "20", "--eval-every", "10", "--device", "cpu",
         "--threads", "1"]


def cli(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], **kwargs)


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifarx: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


def test_help_lists_the_commands_and_train_options():
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("train", "evaluate", "plugins", "describe", "ui"):
        assert command in result.stdout
    train_help = cli("train", "--help").stdout
    for option in ("--arch", "--aug", "--iters", "--batch-size", "--eval-every", "--optimizer",
                   "--lr", "--momentum", "--weight-decay", "--schedule", "--seed", "--device",
                   "--data-dir", "--train-split", "--experiment", "--run-name", "--tracking-uri",
                   "--threads", "--probe"):
        assert option in train_help


def test_version():
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.startswith("cifarx ")


def test_plugins_table_and_json():
    table = cli("plugins")
    assert table.exit_code == 0
    for name in ("table1", "flip", "crop", "normalize", "raw", "cifar10"):
        assert name in table.stdout
    listed = json.loads(cli("plugins", "--json").stdout)
    row = next(r for r in listed["plugins"] if r["name"] == "table1")
    assert row["kind"] == "architecture" and row["package"] == "cifarx" and row["version"]
    assert row["summary"] and row["clash"] is False


class Clash:
    @hookimpl
    def register_architectures(self, register):
        register(Architecture(name="twin", build=lambda **kw: nn.Flatten(), summary="one"))


class BrokenHook:
    @hookimpl
    def register_augmentations(self, register):
        raise ValueError("bad plugin")


def test_clashes_show_in_plugins_and_fail_only_when_used(register_plugin, data_dir, in_tmp):
    register_plugin(Clash(), "pkg-a")
    register_plugin(Clash(), "pkg-b")
    result = cli("plugins")
    assert result.exit_code == 0 and "twin (clash)" in result.stdout
    assert [r["clash"] for r in json.loads(cli("plugins", "--json").stdout)["plugins"]
            if r["name"] == "twin"] == [True, True]
    one_line_error(cli("train", "--arch", "twin", "--data-dir", data_dir, *QUICK),
                   "architecture 'twin' is registered by more than one package", "pkg-a", "pkg-b")


def test_a_broken_plugin_is_one_warning_and_the_cli_keeps_working(register_plugin):
    register_plugin(BrokenHook(), "broken-pkg")
    result = cli("plugins")
    assert result.exit_code == 0 and "table1" in result.stdout
    warnings = [l for l in result.stderr.splitlines() if l.startswith("cifarx: warning:")]
    assert len(warnings) == 1 and "broken-pkg" in warnings[0] and "bad plugin" in warnings[0]


@pytest.mark.parametrize("args, fragments", [
    (["--arch", "resnet9000"], ["unknown architecture 'resnet9000'", "available: ", "table1"]),
    (["--aug", "flip,spin"], ["unknown augmentation 'spin'", "crop, cutmix, erasing, flip"]),
    (["--aug", "raw,normalize"], ["normalizations", "choose one"]),
    (["--optimizer", "lbfgs"], ["unknown optimizer 'lbfgs'", "sgd, nesterov, adam"]),
    (["--schedule", "sometimes"], ["unknown schedule 'sometimes'", "cosine"]),
    (["--precision", "fp16"], ["unknown precision 'fp16'", "auto, fp32, bf16"]),
    (["--train-split", "batch7"], ["--train-split 'batch7'", "batch1, all"]),
    (["--device", "tpu"], ["unknown device 'tpu'", "auto, cpu, cuda"]),
    (["--lr", "-1"], ["--lr must be a positive finite number"]),
    (["--lr", "inf"], ["--lr must be a positive finite number, got inf"]),
    (["--iters", "0"], ["--iters must be at least 1"]),
    (["--batch-size", "100000"], ["--batch-size 100000 is larger than the 200 training images"]),
    (["--probe", "nope"], ["unknown probe 'nope'"]),
    (["--tracking-uri", "bogus://x"], ["cannot open an MLflow run at bogus://x"]),
])
def test_bad_train_input_is_one_line_and_status_2(data_dir, in_tmp, args, fragments):
    base = ["--data-dir", data_dir, *QUICK]
    one_line_error(cli("train", *base, *args), *fragments)


def test_missing_dataset_offline_is_one_line(tmp_path, in_tmp, monkeypatch):
    from cifarx.plugins import datasets

    monkeypatch.setattr(datasets, "URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    one_line_error(cli("train", "--data-dir", tmp_path / "nothing", *QUICK),
                   str(tmp_path / "nothing"), "CIFARX_DATA_DIR")
    assert not (in_tmp / "mlflow.db").exists()  # bad input opens no run


def test_typer_usage_errors_exit_2():
    assert cli("train", "--iters", "many").exit_code == 2
    assert cli("evaluate").exit_code == 2  # --model is required


def test_describe_prints_layers_shapes_and_parameters():
    result = cli("describe", "table1")
    assert result.exit_code == 0
    assert "conv1" in result.stdout and "32 x 32 x 32" in result.stdout
    assert "145,770" in result.stdout
    one_line_error(cli("describe", "nope"), "unknown architecture 'nope'")


def test_train_then_evaluate_through_the_cli(data_dir, in_tmp):
    trained = cli("train", "--data-dir", data_dir, *QUICK, "--experiment", "cli")
    assert trained.exit_code == 0, trained.output
    assert "final test accuracy" in trained.stdout and "cifarx ui" in trained.stdout
    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")  # the default store: the working dir
    (run,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "table1 (flip,normalize,crop)"
    assert (in_tmp / "mlruns").is_dir()

    evaluated = cli("evaluate", "--model", f"runs:/{run.info.run_id}/model", "--data-dir", data_dir,
                    "--device", "cpu", "--experiment", "cli")
    assert evaluated.exit_code == 0, evaluated.output
    assert "per-class test accuracy" in evaluated.stdout and "airplane" in evaluated.stdout
    (evaluation,) = client.search_runs([client.get_experiment_by_name("cli").experiment_id],
                                       filter_string="tags.`cifarx.source_run` != ''")
    assert evaluation.data.tags["cifarx.source_run"] == run.info.run_id
    assert evaluation.data.metrics["test/acc"] == pytest.approx(run.data.metrics["final/test_acc"])
    assert "test/acc/airplane" in evaluation.data.metrics
    figures = [a.path for a in client.list_artifacts(evaluation.info.run_id, "figures")]
    assert figures == ["figures/confusion-matrix.png"]


def test_evaluate_bad_model_is_one_line(data_dir, in_tmp, tmp_path):
    one_line_error(cli("evaluate", "--model", "runs:/0123456789abcdef0123456789abcdef/model",
                       "--data-dir", data_dir), "no run", "set --tracking-uri")
    one_line_error(cli("evaluate", "--model", tmp_path, "--data-dir", data_dir),
                   "no MLflow model there")


@pytest.mark.parametrize("width", [80, 120])
def test_the_progress_line_keeps_bar_count_and_speed_at_80_columns(width, monkeypatch):
    import io

    from rich.console import Console

    from cifarx.cli import console

    monkeypatch.setattr(console, "err", Console(file=io.StringIO(), width=width))
    shown = console.TrainingProgress(2000, 100, "table1 (flip,normalize,crop)")
    shown.progress.update(shown.task, completed=600, loss="1.631", train="43.0%",
                          test="41.33%", speed="394")
    out = io.StringIO()
    Console(file=out, width=width).print(shown.progress.make_tasks_table(shown.progress.tasks))
    line = out.getvalue().rstrip("\n")
    assert "━" in line and "600/2000" in line and "394 img/s" in line and "…" not in line
    assert len(line) <= width


def test_a_tag_key_mlflow_refuses_is_one_line_and_opens_no_run(data_dir, tmp_path):
    """It was a traceback, exit 1, and a run left FAILED."""
    result = cli("train", *QUICK, "--data-dir", data_dir, "--tag", "🙂=v",
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    one_line_error(result, "--tag 🙂=v: MLflow refuses the key", "alphanumerics")
    assert not (tmp_path / "m.db").exists()


def test_a_command_puts_back_the_sigterm_handler_it_replaced(data_dir, tmp_path):
    """Inside a Python process (pytest) the CLI left SIGTERM raising Terminated for good."""
    import signal

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert cli("plugins").exit_code == 0
        one_line_error(cli("train", "--arch", "nope", "--data-dir", data_dir))
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_progress_is_plain_lines_as_it_goes_when_output_is_not_a_terminal(data_dir, tmp_path,
                                                                          monkeypatch):
    """With output to a file nothing appeared until the run ended (a killed run: nothing)."""
    from cifarx.cli.console import TrainingProgress

    monkeypatch.setattr(TrainingProgress, "EVERY", 0.0)  # a line at every metrics flush
    result = cli("train", *QUICK, "--data-dir", data_dir,
                 "--tracking-uri", f"sqlite:///{tmp_path}/m.db")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ")]
    assert len(lines) >= 2 and lines[-1].startswith("step 20/20 (100%)  loss ")
    assert "test " in lines[-1] and "img/s" in lines[-1] and "ETA" in lines[-1]
