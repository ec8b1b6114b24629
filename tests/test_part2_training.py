"""Part 2 end to end: options checked and logged, each architecture trained with the probes and
read back from MLflow, and a diverging run stopped cleanly."""

import pytest
from mlflow import MlflowClient
from torch import nn
from typer.testing import CliRunner

from cifarx import Architecture, UserError, hookimpl
from cifarx.cli import app
from cifarx.errors import Diverged
from cifarx.runs import Tracking, train_run
from cifarx.tracking.run import as_logged
from cifarx.training.config import TrainConfig, plan
from cifarx.training.loop import assemble, train

from test_cli import QUICK, one_line_error


def quick(data_dir, **overrides) -> TrainConfig:
    settings = dict(data_dir=str(data_dir), iters=6, batch_size=10, eval_every=3, device="cpu",
                    threads=1)
    return TrainConfig(**{**settings, **overrides})


def test_options_are_resolved_with_their_defaults_and_logged_as_params(data_dir):
    p = plan(quick(data_dir, arch="plain20", arch_options=("activation=silu",),
                   probes=("grad-max", "grad-norm"),
                   probe_options=("grad-norm.stride=2", "grad-max.first=conv2")))
    assert p.arch_options == {"activation": "silu", "init": "default", "dropout": 0.0}
    assert p.probe_options == {"grad-max": {"first": "conv2", "last": ""},
                               "grad-norm": {"stride": 2}}  # typed by the schema
    assert p.config.arch_options == ("activation=silu", "init=default", "dropout=0.0")
    params = p.params()
    assert params["arch.activation"] == "silu" and params["arch.init"] == "default"
    assert params["probe.grad-norm.stride"] == "2" and params["probe.grad-max.first"] == "conv2"
    assert params["probe.grad-max.last"] == "(not set)"  # unset: the plugin chooses
    assert "arch_options" not in params and "probe_options" not in params
    assert plan(p.config).config == p.config  # resolving again changes nothing


@pytest.mark.parametrize("overrides, message", [
    (dict(arch_options=("activation=tanh",)),
     "--arch-opt activation=tanh: not accepted by convonly; accepted: relu, relu6, leaky_relu, "
     "elu, silu"),
    (dict(arch_options=("act=silu",)),
     "--arch-opt act=silu: convonly has no option 'act'; accepted: activation, init"),
    (dict(arch_options=("activation",)),
     "--arch-opt 'activation': expected NAME=VALUE (`cifarx describe` lists a plugin's options)"),
    (dict(arch_options=("init=he", "init=xavier")),
     "--arch-opt init=xavier: init is given twice ('he' and 'xavier'); give it once"),
    (dict(probes=("grad-max",), probe_options=("grad-max.every=3",)),
     "--probe-opt grad-max.every=3: grad-max has no option 'every'; accepted: first, last"),
    (dict(probe_options=("grad-norm.stride=5",)),
     "--probe-opt grad-norm.stride=5: 'grad-norm' is not among the plugins the run uses (none "
     "given); add it first"),
    (dict(probes=("grad-max",), probe_options=("stride=5",)),
     "--probe-opt 'stride=5': expected PLUGIN.NAME=VALUE (`cifarx describe` lists a plugin's "
     "options)"),
])
def test_bad_options_are_refused_before_anything_runs(data_dir, overrides, message):
    with pytest.raises(UserError) as caught:
        plan(quick(data_dir, arch="convonly", **overrides))
    assert message in str(caught.value)


def test_an_architecture_without_options_refuses_any(data_dir, register_plugin):
    class Bare:
        @hookimpl
        def register_architectures(self, register):
            register(Architecture(name="bare", build=lambda **kw: nn.Flatten()))

    register_plugin(Bare(), "bare")
    with pytest.raises(UserError, match="--arch-opt init=he: bare has no option 'init'; "
                                        "accepted: none"):
        plan(quick(data_dir, arch="bare", arch_options=("init=he",)))


def test_options_reach_the_network(data_dir):
    p = plan(quick(data_dir, arch="convonly", arch_options=("activation=elu",)))
    net = assemble(p, p.load_data()).model.net
    assert isinstance(net.act1, nn.ELU)


@pytest.mark.parametrize("args, fragments", [
    (["--arch", "convonly", "--arch-opt", "activation=tanh"],
     ["--arch-opt activation=tanh", "accepted: relu, relu6, leaky_relu, elu, silu"]),
    (["--arch", "plain20", "--arch-opt", "batchnorm=false"],
     ["plain20 has no option 'batchnorm'", "accepted: activation, init, dropout"]),
    (["--arch", "convonly", "--probe", "grad-max", "--probe-opt", "grad-max.first=conv9"],
     ["no module 'conv9'", "conv1, conv2, conv3, conv4, classifier"]),
    (["--arch", "convonly", "--probe", "grad-norm", "--probe-opt", "grad-norm.stride=0"],
     ["--probe-opt grad-norm.stride=0: not accepted by grad-norm; accepted: a whole number in "
      "[1, inf)"]),
    (["--probe", "grad-max", "--probe-opt", "grad-norm.stride=5"],
     ["'grad-norm' is not among the plugins the run uses (grad-max)"]),
    (["--probe", "grad-maxx"], ["unknown probe 'grad-maxx'", "grad-max, grad-norm"]),
])
def test_bad_options_through_the_cli_are_one_line_and_open_no_run(data_dir, in_tmp, args,
                                                                  fragments):
    one_line_error(CliRunner().invoke(app, ["train", "--data-dir", data_dir, *QUICK, *args]),
                   *fragments)
    assert not (in_tmp / "mlflow.db").exists()


def test_train_help_lists_the_part_2_options():
    text = CliRunner().invoke(app, ["train", "--help"], terminal_width=200).stdout
    for option in ("--arch-opt", "--probe-opt", "--pretrained"):
        assert option in text


@pytest.mark.parametrize("arch", ["convonly", "plain20", "residual", "timm:test_resnet"])
def test_each_architecture_trains_with_the_probes_logged_to_mlflow(arch, data_dir, tracking_uri,
                                                                    in_tmp):
    done = train_run(quick(data_dir, arch=arch, probes=("grad-max", "grad-norm"),
                           probe_options=("grad-norm.stride=4",)),
                     Tracking(tracking_uri, "part2", arch))
    result, run_id = done.result, done.run_id
    client = MlflowClient(tracking_uri)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED"
    assert logged.data.params["probe"] == "grad-max,grad-norm"
    assert logged.data.params["probe.grad-norm.stride"] == "4"
    for key in ("grad_max/first_conv", "grad_max/last_conv"):
        points = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in points) == list(range(1, 7))
        assert all(m.value > 0 for m in points)
        assert [as_logged(v) for _, v in result.history[key]] == [
            m.value for m in sorted(points, key=lambda m: m.step)]
    norms = [k for k in logged.data.metrics if k.startswith("grad_norm/")]
    convs_and_linears = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in result.model.modules())
    assert len(norms) == convs_and_linears
    assert sorted(m.step for m in client.get_metric_history(run_id, norms[0])) == [1, 4]
    figures = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert figures == {"figures/training.png", "figures/grad-max.png", "figures/grad-norm.png"}
    if arch != "timm:test_resnet":
        assert logged.data.params["arch.activation"] == "relu"


class NaNAfter:
    """An architecture whose logits become NaN from its 30th training forward on."""

    @hookimpl
    def register_architectures(self, register):
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 10, 32)
                self.flat = nn.Flatten()
                self.calls = 0

            def forward(self, x):
                self.calls += self.training
                logits = self.flat(self.conv(x))
                return logits * float("nan") if self.calls >= 30 and self.training else logits

        register(Architecture(name="test-nan", build=lambda **kw: Net()))


def test_divergence_is_caught_at_a_flush_and_raises_with_the_step(data_dir, register_plugin):
    register_plugin(NaNAfter(), "nan-after")
    p = plan(quick(data_dir, arch="test-nan", iters=100, eval_every=1000))
    with pytest.raises(Diverged) as caught:
        train(p, p.load_data())
    assert caught.value.step == 30 and str(caught.value.value) == "nan"
    assert "iteration 30 of 100" in str(caught.value)


def test_a_diverged_run_ends_failed_in_one_line_with_status_3(data_dir, in_tmp, register_plugin):
    register_plugin(NaNAfter(), "nan-after")
    result = CliRunner().invoke(app, ["train", "--arch", "test-nan", "--data-dir", data_dir,
                                      "--iters", "100", "--batch-size", "20", "--eval-every",
                                      "1000", "--device", "cpu", "--threads", "1",
                                      "--probe", "grad-max", "--experiment", "diverge"])
    assert result.exit_code == 3, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cifarx: error: training diverged: train/loss is nan at iteration 30")
    assert "ends FAILED" in last and "--lr" in last
    assert "Traceback" not in result.output

    client = MlflowClient(f"sqlite:///{in_tmp}/mlflow.db")  # where the CLI put it
    (run,) = client.search_runs([client.get_experiment_by_name("diverge").experiment_id])
    assert run.info.status == "FAILED" and run.info.run_id in last
    assert run.data.tags["cifarx.diverged_at"] == "30"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 51))  # flushed up to the check at step 50, then stop
    assert len(client.get_metric_history(run.info.run_id, "grad_max/first_conv")) == 50
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/training.png", "figures/grad-max.png"}
    assert "model" not in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_huge_learning_rate_diverges_cleanly_too(data_dir):
    p = plan(quick(data_dir, arch="plain20", iters=25, eval_every=1000, lr=1e6,
                   schedule="none", batch_size=10))
    with pytest.raises(Diverged) as caught:
        train(p, p.load_data())
    assert 1 <= caught.value.step <= 25
    assert "try a lower --lr, another --arch-opt init" in str(caught.value)
