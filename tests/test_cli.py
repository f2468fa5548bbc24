"""The echo-lvdm console script: help, configs that stack in the documented order, logs under default_root_dir, a
real fit (resumed fits: tests/test_resume.py)."""

import re
from pathlib import Path

import pytest
import yaml

from datamodules.datamodule import NO_ROOT
from datamodules.errors import UserInputError
from echo_lvdm.main import main
from tests.helpers.cli import DATA_CONFIGS, REAL_DATA, REPO, config_stack, merged_yaml, print_config, run_cli

# configs/pipeline/* order whole runs of these configs (tests/test_pipeline.py resolves each of their stages)
CONFIGS = sorted(path for path in (REPO / "configs").rglob("*.yaml") if path.parent.name != "pipeline")
MODEL_CONFIGS = [path for path in CONFIGS if path.parent == REPO / "configs"]
LOCATIONS = ("root", "train_root", "val_root", "test_root", "latent_dir")
TOY = "tests.helpers.toy_models.MeanBrightnessEF"


def test_console_script_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in ("fit", "validate", "test", "predict", "phantom", "inspect", "export-vae", "sample", "evaluate",
                    "calibrate", "pipeline"):
        assert f"\n  {command} " in result.stdout


def test_plain_command_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["phantom", "--help"])
    assert exited.value.code == 0
    assert "--videos-per-patient" in capsys.readouterr().out
    assert main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


def assert_sets(expected, resolved, where: str = "") -> None:
    """Every value ``expected`` sets is in ``resolved``: mappings key by key, callback lists class by class."""
    if isinstance(expected, dict):
        assert isinstance(resolved, dict), f"{where}: expected a mapping, resolved {resolved!r}"
        for key, value in expected.items():
            assert key in resolved, f"{where}.{key} missing from the resolved config"
            assert_sets(value, resolved[key], f"{where}.{key}")
    elif isinstance(expected, list) and expected and isinstance(expected[0], dict):
        assert [item.get("class_path") for item in resolved] == [item["class_path"] for item in expected], where
        for index, (item, got) in enumerate(zip(expected, resolved)):
            assert_sets(item, got, f"{where}[{index}]")
    else:
        assert resolved == expected, f"{where}: the stack sets {expected!r}, resolved {resolved!r}"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_resolves_with_what_it_sets(capsys, config):
    """Stacked as the README documents (a data config first; an overlay after its model config), every value each
    config of the stack sets is in the resolved config — nothing a config says is lost — and the data location is the
    data config's, whatever model config comes after it."""
    stack = config_stack(config)
    content = merged_yaml(stack)
    subcommand = "predict" if "return_predictions" in content else "fit"
    resolved = print_config(capsys, *sum((["--config", str(path)] for path in stack), []), subcommand=subcommand)
    assert_sets(content, resolved)
    if REAL_DATA in stack:
        real = yaml.safe_load(REAL_DATA.read_text())["data"]
        assert (resolved["data"]["root"], resolved["data"]["latent_dir"]) == (real["root"], real["latent_dir"])
    assert resolved["model"]["class_path"]


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: p.name)
def test_model_configs_leave_locations_to_data_configs(config):
    """Model configs say how data is sampled, never where it is; logs follow trainer.default_root_dir."""
    content = yaml.safe_load(config.read_text())
    assert not set(content.get("data", {})) & set(LOCATIONS), f"{config.name} sets a dataset location"
    logger = content.get("trainer", {}).get("logger")
    assert not (isinstance(logger, dict) and "save_dir" in logger.get("init_args", {}))


def test_a_run_without_a_data_location_names_the_flag_and_the_data_configs(counter_folder):
    with pytest.raises(ValueError, match="no dataset folder") as raised:
        main(["fit", "--config", str(REPO / "configs/vae.yaml"), "--config", str(REPO / "configs/vae_quickstart.yaml"),
              "--trainer.accelerator", "cpu"])
    assert str(raised.value) == NO_ROOT
    assert "--data.root" in NO_ROOT and "configs/data/phantom.yaml" in NO_ROOT
    assert all((DATA_CONFIGS / name).is_file() for name in ("phantom.yaml", "echonet_dynamic.yaml"))


def test_an_overlay_without_its_model_config_is_refused_with_the_config_to_add():
    with pytest.raises(UserInputError) as raised:
        main(["fit", "--config", str(REPO / "configs/data/phantom.yaml"),
              "--config", str(REPO / "configs/lvdm_quickstart.yaml")])
    message = str(raised.value)
    assert re.search(r"lvdm_quickstart\.yaml changes a model, but no config names one .* --config \S*configs/lvdm\.yaml "
                     r"--config \S*configs/lvdm_quickstart\.yaml", message), message


def readme_lightning_commands() -> list[str]:
    """Every `echo-lvdm fit|validate|test|predict` command of the README, continuation lines joined."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    return re.findall(r"^\s*(echo-lvdm (?:fit|validate|test|predict) .+)$", text, flags=re.M)


def test_every_real_data_command_of_the_readme_reads_the_real_dataset(capsys):
    commands = [command for command in readme_lightning_commands() if "configs/data/echonet_dynamic.yaml" in command]
    assert len(commands) >= 5
    for command in commands:
        words = command.split()
        configs = [str(REPO / words[i + 1]) for i, word in enumerate(words) if word == "--config"]
        overrides = [word for word in words if word.split("=")[0] in ("--data.root", "--data.val_root", "--data.test_root")]
        assert not overrides, command
        resolved = print_config(capsys, *sum((["--config", path] for path in configs), []), subcommand=words[1])
        assert resolved["data"]["root"] == "/data/EchoNet-Dynamic", command


def test_configs_stack_left_to_right(capsys, tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("data:\n  clip_length: 4\n  root: elsewhere\n")
    resolved = print_config(capsys, "--config", str(REPO / "configs/data/phantom.yaml"), "--config", str(override),
                            "--model", TOY, "--data.batch_size", "3")
    assert (resolved["data"]["clip_length"], resolved["data"]["root"], resolved["data"]["batch_size"]) == (4, "elsewhere", 3)
    assert resolved["data"]["latent_dir"] == "latents"  # untouched keys come from the first config
    assert resolved["model"]["class_path"] == TOY


def toy_fit(counter_folder: Path, out: Path, *args: str) -> None:
    main(["fit", "--data.root", str(counter_folder), "--data.clip_length", "4", "--data.batch_size", "2",
          "--model", TOY, "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(out), *args])


def test_logs_and_checkpoints_land_under_default_root_dir(counter_folder, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    toy_fit(counter_folder, work / "run")
    toy_fit(counter_folder, work / "run")
    for version in ("version_0", "version_1"):
        folder = work / "run" / version
        assert {"metrics.csv", "config.yaml", "hparams.yaml"} <= {p.name for p in folder.iterdir()}
        assert (folder / "checkpoints" / "last.ckpt").is_file()  # the shared checkpoint callback
    assert sorted(p.name for p in work.iterdir()) == ["run"]  # nothing in ./logs or ./lightning_logs
    saved = yaml.safe_load((work / "run" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["logger"]["init_args"]["save_dir"] == str(work / "run")
    toy_fit(counter_folder, work / "tb", "--config", str(REPO / "configs/logger/tensorboard.yaml"))
    assert list((work / "tb" / "version_0").glob("events.out.tfevents.*"))
    toy_fit(counter_folder, work / "elsewhere", "--trainer.logger.init_args.save_dir", str(work / "logs_here"))
    assert (work / "logs_here" / "version_0" / "metrics.csv").is_file()
