"""`echo-lvdm pipeline`: stages run in order with the artifacts of the earlier ones, a finished stage is skipped by the
next run, `--redo` reruns a stage and the later ones, and a pipeline killed inside a stage resumes without redoing the
finished stages. (The full quickstart pipeline is measured in the README; here its first stages run on a tiny phantom.)"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.latents import read_meta
import echo_lvdm.pipeline as pipeline_command
from echo_lvdm.main import main
from tests.helpers.cli import REPO, print_config
from tests.helpers.processes import kill_when

TINY_VAE_ARGS = ["--trainer.max_epochs", 2, "--trainer.limit_train_batches", 2, "--trainer.limit_val_batches", 2,
                 "--data.size", 32, "--model.sample_size", 32, "--data.num_workers", 0,
                 "--trainer.enable_progress_bar", "false"]


def tiny_config(tmp_path: Path, **vae: list) -> Path:
    config = {"data": {"phantom": ["--patients", 6, "--videos-per-patient", 1, "--seed", 2, "--size", 32,
                                   "--frames", 16, 20]},
              "stages": {"vae": {"config": ["configs/vae.yaml", "configs/vae_quickstart.yaml"], "args": vae.get("args", TINY_VAE_ARGS)},
                         "encode": {"config": "configs/vae_encode.yaml",
                                    "args": ["--data.num_workers", 0, "--trainer.enable_progress_bar", "false"]}}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def pipeline(config: Path, out: Path, *extra: str) -> int:
    return main(["pipeline", "--config", str(config), "--out", str(out), "--stop-after", "encode", *extra])


def done(out: Path, stage: str) -> dict:
    return json.loads((out / stage / "DONE.json").read_text())


def test_stages_pass_artifacts_and_finished_stages_are_skipped(tmp_path, caplog, monkeypatch):
    config, out = tiny_config(tmp_path), tmp_path / "run"
    caplog.set_level(logging.INFO)
    assert pipeline(config, out) == 0
    # Each stage used the previous one's artifacts: the cache holds every phantom video, encoded by the fitted VAE.
    vae = done(out, "vae")
    assert Path(vae["checkpoint"]).name == "last.ckpt" and "val/psnr" in vae["metrics"]
    assert Path(done(out, "export")["vae"], "config.json").is_file()
    latents = sorted(Path(done(out, "encode")["latent_dir"]).glob("*.safetensors"))
    assert len(latents) == 6 and all(read_meta(path) is not None for path in latents)
    summary = (out / "summary.md").read_text()
    psnr = vae["metrics"]["val/psnr"]
    assert "| vae |" in summary and f"| VAE reconstruction PSNR, dB (validation frames) | {psnr:.4g} |" in summary
    stamps = {stage: (out / stage / "DONE.json").stat().st_mtime_ns for stage in ("data", "vae", "export", "encode")}
    caplog.clear()
    assert pipeline(config, out) == 0
    assert caplog.text.count("skipped") == 4 and "VAE fit …" not in caplog.text
    assert stamps == {stage: (out / stage / "DONE.json").stat().st_mtime_ns for stage in stamps}
    encoded = {path.name: path.stat().st_mtime_ns for path in latents}
    caplog.clear()
    assert pipeline(config, out, "--redo", "export") == 0  # export and encode again, from scratch; the rest kept
    assert caplog.text.count("skipped") == 2
    assert all(path.stat().st_mtime_ns > encoded[path.name] for path in latents)
    assert (out / "vae" / "DONE.json").stat().st_mtime_ns == stamps["vae"]
    assert (out / "encode" / "DONE.json").stat().st_mtime_ns > stamps["encode"]
    with pytest.raises(ValueError, match="'nope' is not a stage"):
        pipeline(config, out, "--redo", "nope")

    # A redo that dies inside its first stage leaves no later stage's old result behind to be skipped.
    def dies(run):
        raise KeyboardInterrupt

    stages = pipeline_command.STAGES
    monkeypatch.setattr(pipeline_command, "STAGES", [replace(s, run=dies) if s.name == "export" else s for s in stages])
    with pytest.raises(KeyboardInterrupt):
        pipeline(config, out, "--redo", "export")
    assert not (out / "encode" / "DONE.json").exists() and not (out / "latents").exists()
    monkeypatch.setattr(pipeline_command, "STAGES", stages)
    caplog.clear()
    assert pipeline(config, out) == 0
    assert caplog.text.count("skipped") == 2 and "latent cache …" in caplog.text
    assert len(list(Path(done(out, "encode")["latent_dir"]).glob("*.safetensors"))) == 6


def test_killed_pipeline_resumes_without_redoing_finished_stages(tmp_path):
    # A longer VAE fit, killed once its first epoch's last.ckpt exists.
    args = [*TINY_VAE_ARGS[:1], 6, *TINY_VAE_ARGS[2:]]
    config, out = tiny_config(tmp_path, args=args), tmp_path / "run"
    command = [sys.executable, "-m", "echo_lvdm", "pipeline", "--config", str(config), "--out", str(out),
               "--stop-after", "encode"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(process, lambda: any((out / "vae").rglob("last.ckpt")) if (out / "vae").is_dir() else False)
    assert (out / "data" / "DONE.json").is_file() and not (out / "vae" / "DONE.json").exists()
    data_stamp = (out / "data" / "DONE.json").stat().st_mtime_ns
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "data         done earlier" in resumed.stderr and "vae resumes from" in resumed.stderr
    assert (out / "data" / "DONE.json").stat().st_mtime_ns == data_stamp
    checkpoint = torch.load(done(out, "vae")["checkpoint"], map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 5 and checkpoint["global_step"] == 6  # every epoch once: 6 × 1 batch
    assert len(list(Path(done(out, "encode")["latent_dir"]).glob("*.safetensors"))) == 6


@pytest.mark.parametrize("config", sorted((REPO / "configs/pipeline").glob("*.yaml")), ids=lambda p: p.name)
def test_every_stage_of_a_pipeline_config_resolves(capsys, monkeypatch, config):
    """Each stage's configs exist and, stacked with the stage's own args, resolve under `--print_config`."""
    monkeypatch.setattr(sys, "argv", ["echo-lvdm"])
    stages = yaml.safe_load(config.read_text())["stages"]
    resolved = 0
    for name, stage in stages.items():
        files = (stage or {}).get("config", [])
        files = [files] if isinstance(files, str) else files
        if not files:
            continue
        predicts = any("return_predictions" in yaml.safe_load((REPO / f).read_text()) for f in files)
        command = "predict" if predicts else "fit"
        printed = print_config(capsys, *sum((["--config", str(REPO / f)] for f in files), []),
                               *pipeline_command.as_arguments(stage.get("args", [])), subcommand=command)
        assert printed["model"]["class_path"], name
        resolved += 1
    assert resolved >= 8  # vae, encode, reid, ef, anatomy, video, generate, ef_synthetic


@pytest.mark.parametrize("name", ["quickstart.yaml", "phantom_study.yaml"])
def test_training_time_coverage_samples_what_the_generate_stage_ships(capsys, tmp_path, name):
    """The video stage's callback animates the anatomy stage's frames with the generate stage's requests, sampler,
    steps and guidance, compared as `evaluate` compares; the anatomy stage's samples its own frames with the same
    requests. Both callback specs are valid CoverageCallback arguments."""
    config = yaml.safe_load((REPO / "configs/pipeline" / name).read_text())
    job = pipeline_command.Run(config, tmp_path, REPO)
    job.artifacts = {"reid": {"checkpoint": "reid.ckpt"}, "export": {"vae": "vae"}}
    video = pipeline_command._coverage(job, "video", ef_regressor="ef.ckpt", vae="vae", anatomy="lidm.ckpt")
    generate, writer = config["stages"]["generate"], config["stages"]["generate"]["writer"]
    expected = {"reid": "reid.ckpt", "anatomy": "lidm.ckpt", "steps": writer["steps"],
                "guidance_scale": writer["guidance_scale"], **config["stages"]["video"]["coverage"],
                **({"sampler": writer["sampler"]} if "sampler" in writer else {}),
                "requests": {k: v for k, v in generate["requests"].items() if k != "attempts"}}
    assert expected.items() <= video["init_args"].items()
    assert expected["protocol"] == "clip:16@12.5fps"
    anatomy = pipeline_command._coverage(job, "anatomy", vae="vae")["init_args"]
    assert not {"sampler", "steps", "guidance_scale"} & anatomy.keys() and anatomy["requests"] == expected["requests"]
    for spec, model in ((video, "lvdm"), (pipeline_command._coverage(job, "anatomy", vae="vae"), "lidm")):
        printed = print_config(capsys, "--config", str(REPO / f"configs/{model}.yaml"),
                               "--config", str(REPO / f"configs/{model}_quickstart.yaml"),
                               "--trainer.callbacks", json.dumps([spec]))
        (callback,) = [c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("CoverageCallback")]
        assert {key: callback["init_args"][key] for key in spec["init_args"]} == spec["init_args"]


def test_optional_stages_run_only_when_the_config_names_them(tmp_path, caplog, monkeypatch):
    """reid_pixel and ef_matched (the seed paper's baselines) are left out of a pipeline that does not name them; named,
    they run in their place in the order, and the summary sets the pixel re-ID's training time beside the latent's."""
    ran = []

    def stage(name, fit_seconds=None):
        def run(job):
            ran.append(name)
            return {"metrics": {"test/auc": 0.9}, **({"fit_seconds": fit_seconds} if fit_seconds else {})}
        return run

    stages = [pipeline_command.Stage("data", stage("data"), "data"),
              pipeline_command.Stage("reid", stage("reid", 10.0), "latent"),
              pipeline_command.Stage("reid_pixel", stage("reid_pixel", 35.0), "pixel", optional=True),
              pipeline_command.Stage("ef", stage("ef"), "ef")]
    monkeypatch.setattr(pipeline_command, "STAGES", stages)
    caplog.set_level(logging.INFO)
    plain, named = tmp_path / "plain.yaml", tmp_path / "named.yaml"
    plain.write_text(yaml.safe_dump({"stages": {"reid": {}}}))
    named.write_text(yaml.safe_dump({"stages": {"reid": {}, "reid_pixel": {}}}))
    assert main(["pipeline", "--config", str(plain), "--out", str(tmp_path / "a")]) == 0
    assert ran == ["data", "reid", "ef"] and "[3/3] ef" in caplog.text
    assert "pixel / latent" not in (tmp_path / "a" / "summary.md").read_text()
    with pytest.raises(ValueError, match="'reid_pixel' is not a stage"):  # not named: not a stage of this pipeline
        main(["pipeline", "--config", str(plain), "--out", str(tmp_path / "a"), "--stop-after", "reid_pixel"])
    ran.clear()
    assert main(["pipeline", "--config", str(named), "--out", str(tmp_path / "b")]) == 0
    assert ran == ["data", "reid", "reid_pixel", "ef"] and "[4/4] ef" in caplog.text
    assert "| re-ID training time, pixel / latent: 35 s / 10 s | 3.50× |" in (tmp_path / "b" / "summary.md").read_text()


def test_ef_matched_trains_on_as_many_real_videos_as_the_synthetic_train_split(tmp_path, monkeypatch):
    synthetic = tmp_path / "synthetic"
    synthetic.mkdir()
    (synthetic / "FileList.csv").write_text("FileName,EF,Split\n" + "".join(
        f"s{i},50,{split}\n" for i, split in enumerate(["TRAIN"] * 5 + ["VAL"] * 2)))
    job = pipeline_command.Run({}, tmp_path / "run", repo=REPO)
    job.artifacts = {"data": {"root": "/real"}, "generate": {"synthetic": str(synthetic)}}
    calls = []
    monkeypatch.setattr(job, "fit", lambda name, overlay: calls.append((name, overlay)) or {"checkpoint": "c", "metrics": {}})
    monkeypatch.setattr(job, "test", lambda name, checkpoint, overlay: calls.append((name, overlay)) or {"test/r2": 0.5})
    result = pipeline_command.stage_ef_matched(job)
    assert calls[0] == ("ef_matched", {"data": {"root": "/real", "train_videos": 5}})
    assert calls[1] == ("ef_matched", {"data": {"root": "/real"}})  # tested on every real TEST video
    assert result["metrics"] == {"test/r2": 0.5, "train_videos": 5}
