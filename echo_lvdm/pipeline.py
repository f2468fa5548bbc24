"""``echo-lvdm pipeline --config configs/pipeline/quickstart.yaml --out DIR``: from an EchoNet-layout folder (or a
phantom it writes) to a privacy-filtered synthetic dataset and its coverage report, one stage after another.

Each stage is an ordinary ``echo-lvdm`` run of configs in ``configs/`` — the pipeline only orders them and passes
artifact paths, through a small overlay config it writes to ``DIR/<stage>/pipeline.yaml`` (read it to rerun a stage by
hand) and a few command-line arguments; the pipeline config's ``args`` for a stage come last and win. A finished stage
writes ``DIR/<stage>/DONE.json`` (its artifacts, metrics and duration) and is skipped by the next run, so a killed
pipeline resumes: a fit killed mid-way continues from its ``last.ckpt``, the latent cache and the synthetic dataset
writer continue where they stopped. ``--redo STAGE`` runs that stage and every later one again.

Stages: data (phantom) → vae → export (diffusers folder) → encode (latent cache) → reid (+τ) → ef (+ test on real)
→ anatomy → video (with the CoverageCallback) → generate (SyntheticDatasetWriter) → ef_synthetic (trained on
synthetic, tested on real) → evaluate (report). ``DIR/summary.md`` holds the final table. Two stages run only when
the pipeline config names them (the seed paper's baselines): reid_pixel (the same re-ID schedule on pixels: its test
AUC and training time beside the latent model's) and ef_matched (an EF regressor trained on as many real videos as the
synthetic dataset's TRAIN split holds, tested on real: the synthetic → real transfer at equal training size).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from datamodules.errors import UserInputError, read_yaml

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="pipeline YAML (configs/pipeline/quickstart.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: every stage's outputs and summary.md")
    parser.add_argument("--redo", metavar="STAGE", help="run this stage and every later one again")
    parser.add_argument("--stop-after", metavar="STAGE", help="stop once this stage is done")


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Run], dict[str, Any]]  # runs the stage; returns its artifacts and metrics
    describe: str
    outputs: tuple[str, ...] = ()  # folders under the run folder besides <name>/ (removed by --redo)
    command: str | None = None  # the LightningCLI command the stage runs (its configs and args are checked up front)
    optional: bool = False  # runs only when the pipeline config's ``stages`` names it


class Run:
    """One pipeline run: the config, the run folder and the artifacts of finished stages."""

    def __init__(self, config: dict[str, Any], out: Path, repo: Path) -> None:
        self.config, self.out, self.repo = config, out.resolve(), repo
        self.artifacts: dict[str, dict[str, Any]] = {}

    def stage_config(self, name: str) -> dict[str, Any]:
        return self.config.get("stages", {}).get(name) or {}

    def folder(self, name: str) -> Path:
        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def artifact(self, stage: str, key: str) -> str:
        return self.artifacts[stage][key]

    def config_files(self, name: str) -> list[str]:
        files = self.stage_config(name).get("config", [])
        paths = [Path(f) if Path(f).is_absolute() else self.repo / f for f in ([files] if isinstance(files, str) else files)]
        for path in paths:
            if not path.is_file():
                raise UserInputError(f"pipeline: stage {name}: config {path} not found")
        return [str(path) for path in paths]

    def base_config(self, name: str) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for path in self.config_files(name):
            merged = _merge(merged, read_yaml(path) or {})
        return merged

    def check(self, stage: Stage) -> None:
        """Resolve a pending stage's configs and ``args`` as its command will (``--print_config``, nothing built): a
        missing config, malformed YAML or an unknown key stops the pipeline before its first stage, not at its turn."""
        import contextlib
        import io

        from echo_lvdm.main import main

        argv = [stage.command, *sum((["--config", f] for f in self.config_files(stage.name)), []),
                *as_arguments(self.stage_config(stage.name).get("args", [])), "--print_config"]
        where = f"pipeline: stage {stage.name} (echo-lvdm {' '.join(argv[:-1])})"
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(argv)
            except UserInputError as err:
                raise UserInputError(f"{where}: {err}") from None
            except SystemExit as exited:  # --print_config exits 0
                if exited.code:
                    raise UserInputError(f"{where}: exit status {exited.code}") from None

    def lightning(self, name: str, command: str, overlay: dict[str, Any], *args: str) -> None:
        """``echo-lvdm <command>`` with the stage's configs, the overlay and the stage's own ``args``."""
        from echo_lvdm.main import main

        overlay_path = self.folder(name) / "pipeline.yaml"
        overlay_path.write_text(yaml.safe_dump(overlay, sort_keys=False))
        argv = [command, *sum((["--config", f] for f in self.config_files(name)), []), "--config", str(overlay_path),
                *args, *as_arguments(self.stage_config(name).get("args", []))]
        log.info("pipeline: echo-lvdm %s", " ".join(argv))
        main(argv)

    def plain(self, name: str, command: str, *args: str) -> None:
        from echo_lvdm.main import main

        argv = [command, *args, *as_arguments(self.stage_config(name).get("args", []))]
        log.info("pipeline: echo-lvdm %s", " ".join(argv))
        if main(argv) != 0:
            raise RuntimeError(f"pipeline: stage {name}: `echo-lvdm {' '.join(argv)}` failed")

    def fit(self, name: str, overlay: dict[str, Any], *args: str) -> dict[str, Any]:
        """A fit whose logs and checkpoints live in ``DIR/<name>/``; resumes from a killed run's last.ckpt."""
        folder = self.folder(name)
        overlay = _merge({"trainer": {"default_root_dir": str(folder)}}, overlay)
        resume = _newest(folder, "last.ckpt")
        if resume is not None:
            log.info("pipeline: %s resumes from %s", name, resume)
        begin = time.monotonic()
        self.lightning(name, "fit", overlay, *args, *(["--ckpt_path", str(resume)] if resume is not None else []))
        seconds = time.monotonic() - begin
        checkpoint = _newest(folder, "last.ckpt")
        if checkpoint is None:
            raise RuntimeError(f"pipeline: stage {name} wrote no last.ckpt under {folder}")
        # fit_seconds: this job's fit alone (no test); a resumed fit counts only what it ran, and says so
        return {"checkpoint": str(checkpoint), "metrics": last_metrics(folder), "fit_seconds": round(seconds, 1),
                "fit_resumed": resume is not None}

    def test(self, name: str, checkpoint: str, overlay: dict[str, Any], *args: str) -> dict[str, float]:
        folder = self.folder(f"{name}_test")
        self.lightning(name, "test", _merge({"trainer": {"default_root_dir": str(folder)}}, overlay),
                       "--ckpt_path", checkpoint, *args)
        return last_metrics(folder)


# ------------------------------------------------------------------------------------------------------ stages
def stage_data(job: Run) -> dict[str, Any]:
    data = job.config.get("data", {})
    if "root" in data:
        return {"root": str(Path(data["root"]).resolve())}
    out = job.out / "data"
    job.plain("data", "phantom", "--out", str(out), "--overwrite", *map(str, data.get("phantom", [])))
    return {"root": str(out)}


def stage_vae(job: Run) -> dict[str, Any]:
    return job.fit("vae", {"data": {"root": job.artifact("data", "root")}})


def stage_export(job: Run) -> dict[str, Any]:
    out = job.out / "export" / "vae"
    job.plain("export", "export-vae", "--checkpoint", job.artifact("vae", "checkpoint"), "--out", str(out))
    return {"vae": str(out)}


def stage_encode(job: Run) -> dict[str, Any]:
    cache = job.out / "latents"
    job.lightning("encode", "predict", {"data": {"root": job.artifact("data", "root"), "latent_dir": str(cache)},
                                        "trainer": {"default_root_dir": str(job.folder("encode"))}},
                  "--ckpt_path", job.artifact("vae", "checkpoint"))
    return {"latent_dir": str(cache)}


def _latent_data(job: Run) -> dict[str, Any]:
    return {"data": {"root": job.artifact("data", "root"), "latent_dir": job.artifact("encode", "latent_dir")}}


def stage_reid(job: Run) -> dict[str, Any]:
    # The VAE that wrote the cache encodes the near-copy positives of data.augment_frames (unused without them).
    overlay = _merge(_latent_data(job), {"model": {"init_args": {"augment_vae": job.artifact("export", "vae")}}})
    result = job.fit("reid", overlay)
    result["metrics"].update(job.test("reid", result["checkpoint"], _latent_data(job)))
    return result


def stage_reid_pixel(job: Run) -> dict[str, Any]:
    data = {"data": {"root": job.artifact("data", "root")}}
    result = job.fit("reid_pixel", data)
    result["metrics"].update(job.test("reid_pixel", result["checkpoint"], data))
    return result


def stage_ef(job: Run) -> dict[str, Any]:
    result = job.fit("ef", {"data": {"root": job.artifact("data", "root")}})
    result["metrics"].update(job.test("ef", result["checkpoint"], {"data": {"root": job.artifact("data", "root")}}))
    return result


def _coverage(job: Run, stage: str, **init_args: Any) -> dict[str, Any]:
    """The stage's CoverageCallback: it samples as the generate stage will — the same requests (EF distribution,
    seeds) and, for the video model, sampler, steps and guidance — unless the stage's ``coverage`` settings say
    otherwise."""
    generate = job.stage_config("generate")
    sampling = {key: value for key, value in generate.get("writer", {}).items()
                if key in ("sampler", "steps", "guidance_scale") and stage == "video"}
    requests = {key: value for key, value in generate.get("requests", {}).items() if key != "attempts"}
    return {"class_path": "callbacks.coverage.CoverageCallback",
            "init_args": {"reid": job.artifact("reid", "checkpoint"), **({"requests": requests} if requests else {}),
                          **sampling, **init_args, **job.stage_config(stage).get("coverage", {})}}


def stage_anatomy(job: Run) -> dict[str, Any]:
    coverage = _coverage(job, "anatomy", vae=job.artifact("export", "vae"))
    callbacks = job.base_config("anatomy").get("trainer", {}).get("callbacks", []) + [coverage]
    return job.fit("anatomy", _merge(_latent_data(job), {"trainer": {"callbacks": callbacks}}))


def stage_video(job: Run) -> dict[str, Any]:
    vae = job.artifact("export", "vae")
    coverage = _coverage(job, "video", ef_regressor=job.artifact("ef", "checkpoint"), vae=vae,
                         anatomy=job.artifact("anatomy", "checkpoint"))
    callbacks = _patched_callbacks(job.base_config("video"), {"vae": vae}) + [coverage]
    return job.fit("video", _merge(_latent_data(job), {"trainer": {"callbacks": callbacks}}))


def stage_generate(job: Run) -> dict[str, Any]:
    out = job.out / "synthetic"
    writer = {"out": str(out), "reid": job.artifact("reid", "checkpoint"), "vae": job.artifact("export", "vae"),
              "anatomy": job.artifact("anatomy", "checkpoint"), "cache_dir": str(job.folder("generate") / "reid_cache"),
              **job.stage_config("generate").get("writer", {})}
    callbacks = _patched_callbacks(job.base_config("generate"), writer)
    overlay = {"data": {"root": job.artifact("data", "root"), "requests": job.stage_config("generate").get("requests", {})},
               "trainer": {"default_root_dir": str(job.folder("generate")), "callbacks": callbacks}}
    overlay["data"] = {key: value for key, value in overlay["data"].items() if value != {}}
    job.lightning("generate", "predict", overlay, "--ckpt_path", job.artifact("video", "checkpoint"))
    meta = json.loads((out / "dataset.json").read_text())
    metrics = {key: meta[key] for key in ("kept", "dropped", "surplus", "attempts")}
    audit = meta.get("privacy_audit") or {}
    if audit.get("audited"):
        metrics.update({"audit/min_single_recall": audit["min_single_recall"],
                        "audit/combined_recall": audit["combined_recall"],
                        "audit/heldout_false_flags": audit["heldout_false_flags"]["rate"]})
    return {"synthetic": str(out), "metrics": metrics}


def stage_ef_synthetic(job: Run) -> dict[str, Any]:
    data = {"data": {"root": job.artifact("data", "root"), "train_root": job.artifact("generate", "synthetic")}}
    result = job.fit("ef_synthetic", data)
    result["metrics"].update(job.test("ef_synthetic", result["checkpoint"], data))
    return result


def stage_ef_matched(job: Run) -> dict[str, Any]:
    filelist = Path(job.artifact("generate", "synthetic")) / "FileList.csv"
    with open(filelist, newline="") as handle:
        count = sum(row.get("Split", "").upper() == "TRAIN" for row in csv.DictReader(handle))
    if count == 0:
        raise RuntimeError(f"pipeline: stage ef_matched: {filelist} has no TRAIN row to match")
    data = {"data": {"root": job.artifact("data", "root"), "train_videos": count}}
    result = job.fit("ef_matched", data)
    result["metrics"].update(job.test("ef_matched", result["checkpoint"], {"data": {"root": job.artifact("data", "root")}}))
    result["metrics"]["train_videos"] = count
    return result


def stage_evaluate(job: Run) -> dict[str, Any]:
    out = job.out / "evaluation"
    job.plain("evaluate", "evaluate", "--real", job.artifact("data", "root"), "--synthetic",
              job.artifact("generate", "synthetic"), "--reid", job.artifact("reid", "checkpoint"),
              "--ef", job.artifact("ef", "checkpoint"), "--vae", job.artifact("export", "vae"), "--out", str(out),
              "--cache-dir", str(job.folder("evaluate") / "reid_cache"))
    return {"report": str(out / "report.md"), "metrics": json.loads((out / "metrics.json").read_text())}


STAGES = [
    Stage("data", stage_data, "phantom dataset (or the given root)"),
    Stage("vae", stage_vae, "VAE fit", command="fit"),
    Stage("export", stage_export, "VAE → diffusers folder"),
    Stage("encode", stage_encode, "latent cache", ("latents",), command="predict"),
    Stage("reid", stage_reid, "re-ID fit, τ, test", ("reid_test",), command="fit"),
    Stage("reid_pixel", stage_reid_pixel, "re-ID on pixels, fit and test (baseline)", ("reid_pixel_test",),
          command="fit", optional=True),
    Stage("ef", stage_ef, "EF regressor fit and test on real", ("ef_test",), command="fit"),
    Stage("anatomy", stage_anatomy, "anatomy (image) diffusion fit", command="fit"),
    Stage("video", stage_video, "video diffusion fit with coverage", command="fit"),
    Stage("generate", stage_generate, "privacy-filtered synthetic dataset", ("synthetic",), command="predict"),
    Stage("ef_synthetic", stage_ef_synthetic, "EF regressor on synthetic, tested on real", ("ef_synthetic_test",), command="fit"),
    Stage("ef_matched", stage_ef_matched, "EF regressor on as many real videos as synthetic, tested on real",
          ("ef_matched_test",), command="fit", optional=True),
    Stage("evaluate", stage_evaluate, "coverage report", ("evaluation",)),
]


# ------------------------------------------------------------------------------------------------------- running
def run(args: argparse.Namespace) -> int:
    config = read_yaml(args.config) or {}
    named = set(config.get("stages", {}))
    stages = [stage for stage in STAGES if not stage.optional or stage.name in named]
    names = [stage.name for stage in stages]
    for option in ("redo", "stop_after"):
        if getattr(args, option) is not None and getattr(args, option) not in names:
            raise ValueError(f"pipeline: --{option.replace('_', '-')} {getattr(args, option)!r} is not a stage; "
                             f"stages: {', '.join(names)}")
    unknown = named - {stage.name for stage in STAGES}
    if unknown:
        raise ValueError(f"pipeline: {args.config}: unknown stage(s) {', '.join(sorted(unknown))}; "
                         f"stages: {', '.join(stage.name for stage in STAGES)}")
    job = Run(config, args.out, repo=args.config.resolve().parents[2] if _in_configs(args.config) else Path.cwd())
    if args.redo:
        # From scratch, and up front: a fit must not resume from the last run's checkpoint, and a redo killed midway
        # must not leave later stages' old results for the next run to skip.
        for stage in stages[names.index(args.redo):]:
            for folder in (stage.name, *stage.outputs):
                shutil.rmtree(job.out / folder, ignore_errors=True)
    last = names.index(args.stop_after) if args.stop_after else len(stages) - 1
    for stage in stages[: last + 1]:
        if stage.command and not (job.out / stage.name / "DONE.json").is_file():
            job.check(stage)
    started = time.monotonic()
    for number, stage in enumerate(stages, 1):
        done = job.out / stage.name / "DONE.json"
        prefix = f"[{number}/{len(stages)}] {stage.name:<12}"
        if done.is_file():
            job.artifacts[stage.name] = json.loads(done.read_text())
            log.info("%s done earlier (%.0f s), skipped", prefix, job.artifacts[stage.name]["seconds"])
        else:
            log.info("%s %s …", prefix, stage.describe)
            begin = time.monotonic()
            result = stage.run(job)
            result["seconds"] = round(time.monotonic() - begin, 1)
            _write_json(done, result)
            job.artifacts[stage.name] = result
            log.info("%s done in %.0f s", prefix, result["seconds"])
        if stage.name == args.stop_after:
            break
    summary = summary_table(job)
    _write_text(job.out / "summary.md", summary)
    log.info("pipeline: finished in %.0f s (this job)\n\n%s", time.monotonic() - started, summary)
    if "evaluate" in job.artifacts:
        log.info("pipeline: the report is %s", job.artifacts["evaluate"]["report"])
    return 0


SUMMARY = [  # stage, metric, label
    ("vae", "val/psnr", "VAE reconstruction PSNR, dB (validation frames)"),
    ("vae", "val/ssim", "VAE reconstruction SSIM (validation frames)"),
    ("reid", "test/auc", "re-ID test AUC"), ("reid", "val/tau", "τ of the re-ID model's own protocol (frames)"),
    ("reid_pixel", "test/auc", "re-ID test AUC, the same schedule on pixels"),
    ("ef", "test/r2", "EF R² (trained on real, tested on real)"), ("ef", "test/mae", "EF MAE (real → real)"),
    ("anatomy", "val/coverage", "anatomy model: coverage of its frames (last validation)"),
    ("anatomy", "val/reference_coverage", "anatomy model: reference coverage (validation frames)"),
    ("anatomy", "val/memorization_rate", "anatomy model: memorisation rate"),
    ("video", "val/loss", "video val/loss"),
    ("video", "val/coverage", "video model + anatomy: coverage during training (last validation)"),
    ("video", "val/reference_coverage", "reference coverage during training (validation videos)"),
    ("video", "val/memorization_rate", "memorisation rate during training"),
    ("video", "val/tau", "τ of the training-time protocol"),
    ("generate", "audit/min_single_recall", "privacy audit: least recall of one near-copy transform"),
    ("generate", "audit/combined_recall", "privacy audit: recall of the combined transform"),
    ("generate", "audit/heldout_false_flags", "privacy audit: real TEST videos flagged"),
    ("generate", "kept", "synthetic videos kept"), ("generate", "dropped", "dropped by the privacy filter"),
    ("ef_synthetic", "test/r2", "EF R² (trained on synthetic, tested on real)"),
    ("ef_synthetic", "test/mae", "EF MAE (synthetic → real)"),
    ("ef_matched", "train_videos", "EF regressor trained on real at the synthetic TRAIN size: videos"),
    ("ef_matched", "test/r2", "EF R² (trained on that many real, tested on real)"),
    ("evaluate", "coverage", "coverage of the synthetic dataset"),
    ("evaluate", "reference_coverage", "reference coverage (held-out real)"),
    ("evaluate", "memorization_rate", "memorisation rate of the synthetic dataset"),
    ("evaluate", "ef_r2", "EF faithfulness R² (requested vs read)"),
    ("evaluate", "tau", "τ of the evaluation protocol"),
]


def summary_table(job: Run) -> str:
    lines = ["| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {result.get('seconds', 0):.0f} |" for name, result in job.artifacts.items()]
    lines += ["", "| measure | value |", "|---|---|"]
    for stage, key, label in SUMMARY:
        value = job.artifacts.get(stage, {}).get("metrics", {}).get(key)
        if value is not None:
            lines.append(f"| {label} | {value:.4g} |" if isinstance(value, float) else f"| {label} | {value} |")
    latent, pixel = job.artifacts.get("reid", {}), job.artifacts.get("reid_pixel", {})
    # the fits alone where both were timed so; else both stages' fit + test (a stage finished by an older version)
    key, what = ("fit_seconds", "training") if latent.get("fit_seconds") and pixel.get("fit_seconds") \
        else ("seconds", "fit + test")
    if pixel and latent.get(key):
        resumed = " (a fit resumed: partial)" if latent.get("fit_resumed") or pixel.get("fit_resumed") else ""
        lines.append(f"| re-ID {what} time, pixel / latent: {pixel[key]:.0f} s / {latent[key]:.0f} s{resumed} | "
                     f"{pixel[key] / latent[key]:.2f}× |")
    # Coverage depends on |S|: the training-time and the dataset's coverage side by side at equal sample counts.
    video = job.artifacts.get("video", {}).get("metrics", {})
    dataset = job.artifacts.get("evaluate", {}).get("metrics", {})
    for key in sorted((k for k in dataset if k.startswith("coverage@")), key=lambda k: int(k[9:])):
        during = [f"{video[f'val/{name}{key[8:]}']:.4g}" if f"val/{name}{key[8:]}" in video else "–"
                  for name in ("coverage", "filtered_coverage")]
        lines.append(f"| coverage of {key[9:]} videos: during training, all / filtered; of the dataset | "
                     f"{during[0]} / {during[1]}; {dataset[key]:.4g} |")
    return "\n".join(lines) + "\n"


def last_metrics(log_dir: Path) -> dict[str, float]:
    """The last logged value of every column of the newest metrics.csv under ``log_dir``."""
    path = _newest(log_dir, "metrics.csv")
    values: dict[str, float] = {}
    if path is None:
        return values
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            values.update({key: float(value) for key, value in row.items() if value not in ("", None)
                           and key not in ("epoch", "step")})
    return values


def as_arguments(values: list[Any]) -> list[str]:
    """A stage's YAML ``args`` as command-line words, spelled as jsonargparse reads them: null, true, false."""
    return ["null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            for value in values]


def _patched_callbacks(config: dict[str, Any], init_args: dict[str, Any]) -> list[dict[str, Any]]:
    """The config's callbacks with ``init_args`` set wherever a callback already has that argument."""
    callbacks = []
    for callback in config.get("trainer", {}).get("callbacks", []) or []:
        args = dict(callback.get("init_args", {}))
        args.update({key: value for key, value in init_args.items() if key in args
                     or callback["class_path"].endswith("SyntheticDatasetWriter")})
        callbacks.append({**callback, "init_args": args})
    return callbacks


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _newest(folder: Path, name: str) -> Path | None:
    found = sorted(folder.rglob(name), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    return found[-1] if found else None


def _in_configs(path: Path) -> bool:
    parents = path.resolve().parents
    return len(parents) > 2 and parents[1].name == "configs"


def _write_json(path: Path, value: dict[str, Any]) -> None:
    _write_text(path, json.dumps(value, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    from datamodules.video_io import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(text)
