"""Typed configs: YAML files and --set overrides, with errors that name the key."""

from pathlib import Path

import pytest

from pipelines import config as config_module
from pipelines.errors import UserError
from upsr.config_loader import ConfigError, flatten, to_dict


def test_defaults_are_the_papers_values():
    config = config_module.load()
    assert config.degradation.jpeg_range == (30, 95)
    assert config.degradation.kernel_prob == (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    assert config.degradation.second_order_prob == 1.0
    assert config.synth.crop_size == 256


def test_dotted_overrides_keep_yaml_types():
    config = config_module.load("configs/tiny.yaml", ["degradation.jpeg_range=[40,90]", "synth.seed=7",
                                                       "degradation.gaussian_noise_prob=1", "ray.address=null"])
    assert config.degradation.jpeg_range == (40, 90)
    assert config.synth.seed == 7
    assert config.degradation.gaussian_noise_prob == 1.0 and isinstance(config.degradation.gaussian_noise_prob, float)
    assert config.ray.address is None
    assert config.synth.crops_per_image == 8  # from tiny.yaml


def test_unknown_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key degradation\.jpeg_rnage"):
        config_module.load(None, ["degradation.jpeg_rnage=[40,90]"])
    path = tmp_path / "bad.yaml"
    path.write_text("synth:\n  crops_per_imag: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}.*unknown key synth\.crops_per_imag"):
        config_module.load(path)
    with pytest.raises(ConfigError, match="unknown key nonsense"):
        config_module.load(None, ["nonsense.key=1"])


@pytest.mark.parametrize("override, message", [
    ("synth.seed=abc", r"synth\.seed: expected an integer, got 'abc'"),
    ("synth.seed=true", r"synth\.seed: expected an integer"),
    ("degradation.jpeg_range=[40]", r"degradation\.jpeg_range: expected 2 values"),
    ("degradation.jpeg_range=[40, x]", r"degradation\.jpeg_range\[1\]: expected an integer"),
    ("degradation.primitives=magic", r"degradation\.primitives: 'magic' is not one of"),
    ("degradation.kernel_prob=[0.5,0.5,0,0,0,0.5]", "kernel_prob must be non-negative and sum to 1"),
    ("degradation.jpeg_range=[30,120]", "JPEG quality is at most 100"),
    ("synth=3", r"synth: expected a section"),
    ("synth.seed", "expected KEY=VALUE"),
])
def test_wrong_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        config_module.load(None, [override])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = config_module.load("configs/tiny.yaml", ["degradation.jpeg_range=[40,90]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_module.to_yaml(config))
    assert config_module.load(path) == config
    assert flatten(to_dict(config))["degradation.jpeg_range"] == [40, 90]


def test_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config_module.load(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("synth: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{broken} is not valid YAML"):
        config_module.load(broken)


@pytest.mark.parametrize("name", sorted(path.name for path in Path("configs").glob("*.yaml")))
def test_every_shipped_config_loads(name):
    from cli import config as root_config

    root_config.load(Path("configs") / name)


def test_the_demo_config_is_the_tiny_one_on_small_crops_trained_longer_and_deterministic():
    tiny, demo = config_module.load("configs/tiny.yaml"), config_module.load("configs/demo.yaml")
    assert (demo.denoiser, demo.aux) == (tiny.denoiser, tiny.aux)
    assert demo.train_data.deterministic and demo.synth.crop_size < tiny.synth.crop_size
    assert demo.train.steps > tiny.train.steps and demo.aux_train.steps > tiny.aux_train.steps


def test_configs_compose_through_base_and_several_files(tmp_path):
    from cli import config as root_config

    tiny, tune_tiny = config_module.load("configs/tiny.yaml"), root_config.load("configs/tune_tiny.yaml")
    assert tune_tiny.denoiser == tiny.denoiser and tune_tiny.aux == tiny.aux  # from its base
    assert (tune_tiny.train.steps, tiny.train.steps) == (12, 30)  # its own difference
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("train:\n  steps: 7\n")
    both = config_module.load(["configs/tiny.yaml", overlay], ["train.lr=1e-3"])
    assert (both.train.steps, both.train.lr, both.denoiser) == (7, 1e-3, tiny.denoiser)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="its base files include itself"):
        config_module.load(loop)


def test_print_config_shows_the_resolved_config(capsys):
    from cli.main import main

    assert main(["train", "--data", "unused", "--aux", "unused", "--config", "configs/tiny.yaml",
                 "--set", "train.steps=3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 3" in printed and config_module.load("configs/tiny.yaml", ["train.steps=3"]) == \
        config_module.from_yaml(printed)


def test_version_log_level_and_full_job_help(capsys):
    from importlib import metadata

    from cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"upsr-ray {metadata.version('upsr-ray')} (ray 2.60.0, torch ")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    assert "--log-level" in help_text
    import pipelines.train

    assert pipelines.train.__doc__.strip().splitlines()[0] in help_text  # the job's own description
    with pytest.raises(SystemExit) as exited:
        main(["synth", "--log-level", "LOUD"])
    assert exited.value.code == 2 and "invalid choice: 'LOUD'" in capsys.readouterr().err


def test_training_progress_line_gives_step_loss_throughput_and_eta():
    from pipelines.training_loop import progress_line

    line = progress_line("train", 40, 90, {"loss": 0.012345, "samples_per_s": 8.0, "data_wait_fraction": 0.125}, 8)
    # 50 steps left x 8 samples at 8 samples/s = 50 s
    assert line == "train step 40/90 (44%): loss 0.01235, 8.0 samples/s, data wait 12%, ETA 0:00:50"
    assert progress_line("train-aux", 5, 10, {}, 8) == "train-aux step 5/10 (50%): no finite step since the last line"


def test_on_a_cluster_local_outputs_and_a_local_mlflow_file_are_errors_that_say_what_to_set(monkeypatch):
    from pipelines.config import RayConfig
    from pipelines.ray_env import is_local_location, require_shared

    assert [is_local_location(uri) for uri in ("runs/x", "/abs/x", "file:///x", "sqlite:////x/mlflow.db")] == [True] * 4
    assert not any(is_local_location(uri) for uri in ("s3://b/x", "http://mlflow:5000", "postgresql://h/db"))
    local = {"train.storage_path": "/work/runs/ray_results", "mlflow.tracking_uri": "sqlite:////work/runs/mlflow.db"}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    require_shared(RayConfig(), local)  # a private local instance: local paths are right there

    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    with pytest.raises(UserError) as error:
        require_shared(RayConfig(), local)
    message = str(error.value)
    assert message.startswith("connected to the Ray cluster at 10.0.0.5:6379, but train.storage_path = "
                              "/work/runs/ray_results; mlflow.tracking_uri = sqlite:////work/runs/mlflow.db are")
    assert "Set train.storage_path to an s3:// prefix and MLFLOW_TRACKING_URI (or mlflow.tracking_uri) to the " \
           "MLflow server's URL, or pass --allow-local" in message
    require_shared(RayConfig(), {"train.storage_path": "s3://b/runs", "mlflow.tracking_uri": "http://mlflow:5000"})
    require_shared(RayConfig(allow_local=True), local)
    with pytest.raises(UserError, match="at ray://head:10001, but --output = /data is a location"):
        require_shared(RayConfig(address="ray://head:10001"), {"--output": "/data"})


def test_allow_local_is_the_config_key_on_every_job_command(capsys):
    from cli.main import main

    required = {"synth": ["--output", "x"], "train": ["--data", "x"], "train-aux": ["--data", "x"],
                "tune": ["--data", "x", "--aux", "y"], "evaluate": ["--model", "x", "--data", "y"], "promote": []}
    for job, arguments in required.items():
        assert main([job, *arguments, "--set", "ray.num_cpus=2", "--allow-local", "--print-config"]) == 0, job
        printed = capsys.readouterr().out
        assert "allow_local: true" in printed and "num_cpus: 2" in printed, job


def test_verbose_brings_back_ray_data_progress_bars_and_the_harmless_ray_warnings(capsys, monkeypatch):
    import os
    import subprocess
    import sys

    from cli.main import HARMLESS_RAY_LINES, main

    quieting = ("RAY_DEDUP_LOGS_SKIP_REGEX", "RAY_DATA_LOGGING_CONFIG", "MLFLOW_LOGGING_LEVEL",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    for name in quieting:
        monkeypatch.delenv(name, raising=False)
    assert main(["train", "--data", "x", "--verbose", "--print-config"]) == 0
    assert "data_progress_bars: true" in capsys.readouterr().out
    assert not [name for name in quieting if name in os.environ]
    assert main(["train", "--data", "x", "--print-config"]) == 0
    assert "data_progress_bars: false" in capsys.readouterr().out
    assert os.environ["RAY_DEDUP_LOGS_SKIP_REGEX"] == HARMLESS_RAY_LINES
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING" and os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    # Ray Train's deprecation warning from inside its own data set-up stays out, whatever filter
    # importing Ray (with the job's module, in a fresh process) added.
    script = ("import warnings; from cli.main import main; main(['train', '--data', 'x', '--print-config']); "
              "from ray.util.annotations import RayDeprecationWarning; "
              "warnings.warn('`ExecutionOptions.exclude_resources` is deprecated', RayDeprecationWarning)")
    shown = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stderr
    assert "exclude_resources" not in shown, shown
    # Ray Data configured from that file: its INFO lines reach only its log file, warnings the console too.
    levels = subprocess.run(
        [sys.executable, "-c", "import logging, ray.data; "
                               "print(sorted(h.level for h in logging.getLogger('ray.data').handlers))"],
        capture_output=True, text=True, check=True, env=os.environ).stdout
    assert levels.strip() == "[0, 30]", levels
