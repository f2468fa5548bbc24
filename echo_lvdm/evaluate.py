"""``echo-lvdm evaluate``: the coverage, privacy and faithfulness measures of any synthetic folder in EchoNet layout
against a real one — e.g. a published synthetic dataset against EchoNet-Dynamic — with the same code the
:class:`~callbacks.coverage.CoverageCallback` runs during training.

The real folder's ``TRAIN`` videos are the bank R, its held-out split (``--heldout``, default ``TEST``) the reference
H, and every video of the synthetic folder is S (its FileList ``EF`` is the requested EF). A latent re-ID model
(4 input channels) sees frames encoded by the VAE given with ``--vae`` (posterior mean × scaling factor, as the latent
cache stores them), real and synthetic alike. Writes to ``--out``: ``metrics.json``, ``synthetic_scores.csv`` (each
synthetic video's best score, its best-matching training video and whether the privacy filter would drop it),
``report.md`` and ``figures/*.png``. Everything is written under a temporary name and renamed. With ``--inception``
and/or ``--i3d`` (the field's TorchScript extractors) it adds FID, IS and FVD (:mod:`echo_lvdm.evaluate_generative`).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", type=Path, required=True, help="real EchoNet-layout folder (TRAIN = the bank)")
    parser.add_argument("--synthetic", type=Path, required=True, help="synthetic EchoNet-layout folder (all rows)")
    parser.add_argument("--reid", type=Path, required=True, help="ReIDModule checkpoint")
    parser.add_argument("--ef", type=Path, help="EFRegressorModule checkpoint: EF faithfulness of the synthetic set")
    parser.add_argument("--vae", type=Path, help="exported VAE folder; needed by a latent re-ID or EF model")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--heldout", default="TEST", choices=["VAL", "TEST"], help="real split used as reference")
    parser.add_argument("--protocol", help="which frames are compared: first_frame (the seed paper's), frames:N, "
                        "clip:L, clip:L/pP, clip:L@Ffps (default: clips of --clip-length at --period or --fps)")
    parser.add_argument("--tau-heldout", default="VAL", choices=["VAL", "TEST"],
                        help="real split τ is calibrated on, when the re-ID checkpoint has no stored τ of this "
                        "protocol and data (echo-lvdm calibrate)")
    parser.add_argument("--quantile", type=float, help="of τ (default: the re-ID model's, 0.95)")
    parser.add_argument("--size", type=int, help="resize frames to this before the VAE or a pixel re-ID")
    parser.add_argument("--clip-length", type=int, default=16, help="frames per video the EF regressor reads (and "
                        "the default protocol compares)")
    parser.add_argument("--period", type=int, default=1, help="take every n-th frame")
    parser.add_argument("--fps", type=float, help="instead of --period, resample every video to this frame rate: "
                        "real and synthetic videos at different rates then show the same time span")
    parser.add_argument("--ef-size", type=int, help="frame size the EF regressor was trained on")
    parser.add_argument("--k", type=int, default=5, help="neighbours of density and PRDC coverage")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=4, help="memorised pairs shown in the report")
    parser.add_argument("--cache-dir", type=Path, help="embedding cache (default: <out>/reid_cache)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    field = parser.add_argument_group(
        "FID, IS and FVD", "the field's image and video metrics with its TorchScript extractors (StyleGAN-V's "
        "protocol, as EchoNet-Synthetic reports them); the held-out real split is measured the same way beside them")
    field.add_argument("--inception", type=Path, help="StyleGAN2-ADA's inception-2015-12-05.pt: FID and IS of "
                       "every frame of the clips read")
    field.add_argument("--i3d", type=Path, help="StyleGAN-V's i3d_torchscript.pt: FVD of the clips")
    field.add_argument("--fvd-lengths", default="16", help="comma-separated FVD clip lengths, e.g. 16,128; the "
                       "longest is the clip read from every video, from its first frame (default 16)")
    field.add_argument("--fid-fps", type=fps_option, default=32.0, help="frame rate every video is resampled to "
                       "(EchoNet-Synthetic: 32), or 'native'")
    field.add_argument("--fid-size", type=int, default=112, help="frame size the videos are read at (112)")
    field.add_argument("--fid-real", default="TRAIN", choices=["TRAIN", "VAL", "TEST"],
                       help="real split the synthetic set is compared with (EchoNet-Synthetic: TRAIN)")
    field.add_argument("--fid-videos", type=int, help="at most this many videos of each set, in FileList order "
                       "(EchoNet-Synthetic: 2048)")


def fps_option(text: str) -> float | None:
    return None if text == "native" else float(text)


def protocol_of(args: argparse.Namespace):
    """The comparison protocol: ``--protocol``, else clips of ``--clip-length`` at ``--period`` or ``--fps``."""
    from lightning_modules.protocols import Protocol

    if args.protocol:
        return Protocol.parse(args.protocol)
    return Protocol("clip", args.clip_length, 1 if args.fps is not None else args.period, args.fps)


def run(args: argparse.Namespace) -> int:
    from callbacks.coverage_measures import CoverageMeasures
    from datamodules import EchoNetDataModule
    from datamodules.errors import UserInputError
    from lightning_modules.calibration import filter_bank
    from lightning_modules.checkpoints import load_module
    from lightning_modules.reid import load_reid
    from lightning_modules.reid_embeddings import EncodedReID, embed_split
    from lightning_modules.vae_utils import load_frozen_vae

    protocol = protocol_of(args)
    reid = load_reid(args.reid, map_location=args.device)
    latent_reid = reid.hparams.in_channels == 4
    regressor = None
    if args.ef is not None:
        from lightning_modules.ef_regressor import EFRegressorModule

        regressor = load_module(EFRegressorModule, args.ef, map_location=args.device)
        regressor.eval().requires_grad_(False)
    latent_ef = regressor is not None and regressor.hparams.in_channels == 4
    if (latent_reid or latent_ef) and args.vae is None:
        raise UserInputError(f"evaluate: {'the re-ID model' if latent_reid else 'the EF regressor'} works in latent space; "
                         "give --vae <exported VAE folder> to encode the videos")
    vae = load_frozen_vae(args.vae).to(args.device) if args.vae is not None else None
    model = EncodedReID(reid, vae if latent_reid else None)
    channels = int(vae.config.in_channels) if latent_reid else int(reid.hparams.in_channels)
    clips = dict(sampling="clip", clip_length=args.clip_length, period=args.period, fps=args.fps)
    common = dict(pad="reflect", channels=channels, size=args.size, batch_size=args.batch_size, num_workers=0)
    real = EchoNetDataModule(args.real, **common, **protocol.data_options())
    synthetic = EchoNetDataModule(args.synthetic, predict_split="all", **common, **protocol.data_options())
    # Both folders checked before anything is embedded: a broken synthetic FileList must not cost the real set's pass.
    synthetic.setup("predict")
    real.setup()
    generative = None
    if args.inception is not None or args.i3d is not None:
        from echo_lvdm.evaluate_generative import generative_setup

        generative = generative_setup(args)
    cache = args.cache_dir or args.out / "reid_cache"
    # τ stored beside the re-ID checkpoint for this protocol and data (`echo-lvdm calibrate`), else calibrated here
    bank, calibration, source = filter_bank(model, reid, args.reid, real, protocol, cache_dir=cache,
                                            quantile=args.quantile, heldout=args.tau_heldout.lower())
    heldout = embed_split(model, real, args.heldout.lower(), cache_dir=cache)
    log.info("evaluate: protocol %s; bank %d training videos, reference %d %s videos; τ = %.4g, %s", protocol.name,
             len(bank), len(heldout), args.heldout, calibration.tau, source)

    measures = CoverageMeasures(reid, bank, calibration, protocol, ef=regressor is not None, k=args.k).to(args.device)
    measures.update_reference(heldout.index, heldout.embedding)
    # Coverage of the first n videos takes them in FileList row order (a written dataset: the order they were kept).
    measures.sample_order = torch.tensor([record.line for record in synthetic.datasets["all"].records])
    reads_clips = regressor is not None and protocol.data_options() != clips

    def read_ef(video: torch.Tensor) -> torch.Tensor:  # a latent regressor reads the VAE's encoding of the video
        return regressor.read_ef(EncodedReID(reid, vae).latents(video) if latent_ef else video, args.ef_size)
    with torch.no_grad():
        for batch in synthetic.predict_dataloader():
            video, index = batch["video"].to(args.device), batch["index"].to(args.device)
            measures.update_synthetic(index, model.embed_videos(video))
            if regressor is not None and not reads_clips:
                measures.update_ef(index, batch["ef"].to(args.device), read_ef(video))
        if reads_clips:  # the protocol compares other frames than the clips the EF regressor reads
            ef_data = EchoNetDataModule(args.synthetic, predict_split="all", **common, **clips)
            ef_data.setup("predict")
            for batch in ef_data.predict_dataloader():
                measures.update_ef(batch["index"].to(args.device), batch["ef"].to(args.device),
                                   read_ef(batch["video"].to(args.device)))
    result = measures.compute()
    if result is None:
        raise ValueError(f"evaluate: {args.synthetic} has no videos")
    values, details = result
    if generative is not None:
        from echo_lvdm.evaluate_generative import generative_values

        details["generative"] = generative_values(args, generative)
        values.update({name: torch.tensor(value) for name, value in details["generative"].pop("values").items()})
    write_outputs(args, values, details, real, synthetic, calibration, source, len(bank))
    log.info("evaluate: " + ", ".join(f"{name} {float(value):.4g}" for name, value in values.items()))
    return 0


def write_outputs(args: argparse.Namespace, values: dict, details: dict, real, synthetic, calibration,
                  tau_source: str, bank_size: int) -> None:
    from callbacks.coverage_figures import coverage_curves, ef_scatter, hit_count_plot, image_pairs, score_histogram
    from datamodules.video_io import atomic_output
    from lightning_modules.image_logging import to_uint8

    args.out.mkdir(parents=True, exist_ok=True)
    train_set, synthetic_set = real.datasets["train"], synthetic.datasets["all"]
    names = [record.file_name for record in synthetic_set.records]
    train_names = [record.file_name for record in train_set.records]
    tau = calibration.tau
    index, score, match = (details[f"synthetic_{key}"].cpu() for key in ("index", "score", "match"))
    rows = [{"FileName": names[i], "BestScore": round(float(s), 6), "BestMatch": train_names[m],
             "Memorised": bool(s > tau)} for i, s, m in zip(index.tolist(), score.tolist(), match.tolist())]
    if "ef_read" in details:
        for row, requested, read in zip(rows, details["ef_requested"].tolist(), details["ef_read"].tolist()):
            row.update(RequestedEF=round(requested, 3), ReadEF=round(read, 3))
    with atomic_output(args.out / "synthetic_scores.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    title = f"protocol {calibration.protocol}"
    figures = {"scores": score_histogram({"synthetic": score, f"real {args.heldout}": details["reference_score"]},
                                         tau, title=title),
               "coverage": coverage_curves({"synthetic": details["synthetic_curve"],
                                            f"real {args.heldout}": details["reference_curve"]}, bank_size,
                                           title=title),
               "hits": hit_count_plot(details["hits"])}
    if "ef_read" in details:
        figures["ef"] = ef_scatter(details["ef_requested"], details["ef_read"], r2=float(values["ef_r2"]),
                                   mae=float(values["ef_mae"]))
    top = torch.argsort(score, descending=True)[:args.pairs].tolist()
    if top:
        def first_frame(dataset, row: int) -> np.ndarray:
            frame = to_uint8(dataset[row]["video"][0]).numpy()
            return frame[0] if frame.shape[0] == 1 else frame.transpose(1, 2, 0)

        figures["pairs"] = image_pairs([(first_frame(synthetic_set, int(index[i])), first_frame(train_set, int(match[i])),
                                         f"{names[int(index[i])]} s={float(score[i]):.3g}") for i in top])
    (args.out / "figures").mkdir(exist_ok=True)
    from PIL import Image

    for name, image in figures.items():
        with atomic_output(args.out / "figures" / f"{name}.png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")

    summary = {name: float(value) for name, value in values.items()}
    summary.update(tau=tau, protocol=calibration.protocol, tau_calibration={**calibration.as_dict(), "source": tau_source},
                   synthetic_videos=len(rows), training_videos=len(train_set),
                   reference_videos=int(len(details.get("reference_index", []))),
                   memorised_videos=[row["FileName"] for row in rows if row["Memorised"]],
                   real=str(args.real), synthetic=str(args.synthetic), reid=str(args.reid),
                   ef=None if args.ef is None else str(args.ef))
    if "generative" in details:
        summary["generative_metrics"] = details["generative"]
    with atomic_output(args.out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    with atomic_output(args.out / "report.md") as tmp:
        tmp.write_text(report(summary, list(figures), args))


def report(summary: dict, figures: list[str], args: argparse.Namespace) -> str:
    """The Markdown report: the numbers, what they mean, the figures."""
    from echo_lvdm.evaluate_generative import generative_counts, generative_table_rows

    lines = [f"# Coverage report: {args.synthetic}", "",
             f"Real data {args.real} ({summary['training_videos']} training videos, {summary['reference_videos']} "
             f"{args.heldout} videos as reference); {summary['synthetic_videos']} synthetic videos; re-ID "
             f"{args.reid}. Videos are compared under protocol `{summary['protocol']}`; τ = {summary['tau']:.4g} at "
             f"quantile {summary['tau_calibration']['quantile']}, {summary['tau_calibration']['source']}.", "",
             "| measure | value | meaning |", "|---|---|---|"]
    meanings = {
        "coverage": "distinct best-matching training videos / min(|R|, |S|) (seed paper's 'learned')",
        "filtered_coverage": "the same for the synthetic videos at or below τ (what a privacy filter keeps)",
        "reference_coverage": "the same for held-out real videos",
        "relative_coverage": "coverage / reference coverage, both at the smaller set's size",
        "memorization_rate": "share of synthetic videos scoring above τ (the privacy filter drops them)",
        "memorized_coverage": "share of training videos reproduced above τ",
        "ef_r2": "R² of requested vs read EF", "ef_mae": "MAE of requested vs read EF (points)",
        "density": "Naeem et al. density (re-ID space)", "prdc_coverage": "Naeem et al. coverage (re-ID space)",
        "fd_reid": "Fréchet distance to the training set (re-ID space)",
        "temporal_consistency": "mean re-ID similarity of frame 0 with the later frames"}
    lines += [f"| {name} | {summary[name]:.4g} | {text} |" for name, text in meanings.items() if name in summary]
    lines += [f"| {name} | {value:.4g} | coverage of the first {name[9:]} synthetic videos |"
              for name, value in summary.items() if name.startswith("coverage@")]
    lines += generative_table_rows(summary)
    lines += ["", f"Memorised videos ({len(summary['memorised_videos'])}): "
              + (", ".join(summary["memorised_videos"][:20]) or "none")
              + (" …" if len(summary["memorised_videos"]) > 20 else ""), "",
              "Per-video scores: `synthetic_scores.csv`.", ""]
    lines += generative_counts(summary)
    captions = {"scores": "Best re-ID score against the training set, synthetic vs held-out real, τ dashed",
                "coverage": "Coverage against the number of videos compared (it depends on |S|: compare at equal n)",
                "ef": "EF requested vs read by the regressor", "hits": "How often each training video is the best "
                "match (the long tail)", "pairs": "The highest-scoring synthetic videos beside their training match"}
    lines += [f"## {captions[name]}\n\n![{name}](figures/{name}.png)\n" for name in figures]
    return "\n".join(lines)
