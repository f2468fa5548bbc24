"""``echo-lvdm audit``: does the privacy filter catch near-copies of training videos?

Builds canaries from ``--sources`` training videos — shifted, turned, rescaled, noisier, brighter or darker, gamma,
blurred, started later, re-timed, re-encoded, alone at several magnitudes and combined
(:data:`~lightning_modules.privacy_audit.DEFAULT_CANARIES`) — writes each as the synthetic writer writes a video,
reads it back and scores it against every training video under the filter's protocol with the filter's τ (stored
beside the re-ID checkpoint for this protocol, else calibrated on ``--tau-heldout``). Held-out real videos of
``--heldout`` (patients the model never saw, not the split that calibrated τ) go the same way: their share above τ is
the false-flag rate. Writes ``audit.json``, ``audit_scores.csv``, ``audit.md`` and ``figures/audit.png`` to
``--out`` — scores and ordinal canary numbers only, never training file names — and exits 1 when the filter fails
the floors (every single transform's recall ≥ ``--floor``, the combination's ≥ ``--combined-floor``, held-out false
flags ≤ ``--max-false-flags``). Canaries are deleted when the run ends, also when it is killed.

    echo-lvdm audit --real run/data --reid run/reid/version_0/checkpoints/last.ckpt --vae run/export/vae \\
        --protocol clip:16@12.5fps --out run/audit
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
    from lightning_modules.privacy_audit import DEFAULT_FLOORS as FLOORS

    parser.add_argument("--real", "--data.root", dest="real", type=Path, required=True,
                        help="real EchoNet-layout folder: TRAIN is the bank the canaries come from")
    parser.add_argument("--reid", type=Path, required=True, help="ReIDModule checkpoint (the filter's)")
    parser.add_argument("--vae", type=Path, help="exported VAE folder; needed by a latent re-ID model")
    parser.add_argument("--out", type=Path, required=True, help="report folder")
    parser.add_argument("--protocol", default="clip:16",
                        help="the filter's: clip:L, clip:L/pP or clip:L@Ffps (the writer's: num_frames at the data's "
                             "period or fps; default clip:16)")
    parser.add_argument("--sources", type=int, default=24, help="training videos to make canaries of (default 24)")
    parser.add_argument("--heldout", choices=["VAL", "TEST"], default="TEST",
                        help="real videos of new patients for the false-flag rate (default TEST)")
    parser.add_argument("--tau-heldout", choices=["VAL", "TEST"], default="VAL",
                        help="split τ is calibrated on when none is stored (default VAL)")
    parser.add_argument("--quantile", type=float, help="of τ (default: the re-ID model's, 0.95)")
    parser.add_argument("--floor", type=float, default=FLOORS["floor"],
                        help="least recall of every single transform (default 0.99)")
    parser.add_argument("--combined-floor", type=float, default=FLOORS["combined_floor"],
                        help="least recall of the combined transform (default 0.95)")
    parser.add_argument("--max-false-flags", type=float, default=FLOORS["max_false_flags"],
                        help="most held-out real videos flagged (default 0.10; τ's q = 0.95 implies about 0.05)")
    parser.add_argument("--seed", type=int, default=0, help="which sources, clip starts and noise")
    parser.add_argument("--size", type=int, help="resize frames to this before the VAE or a pixel re-ID")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cache-dir", type=Path, help="embedding cache of the bank (default: <out>/reid_cache)")
    parser.add_argument("--scratch", type=Path, help="parent folder of the temporary canary folder (default: the "
                        "system's temporary folder)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    from datamodules import EchoNetDataModule
    from lightning_modules.calibration import filter_bank
    from lightning_modules.privacy_audit import run_audit
    from lightning_modules.protocols import Protocol
    from lightning_modules.reid import load_reid_encoder

    protocol = Protocol.parse(args.protocol)
    if protocol.kind != "clip":
        raise ValueError(f"audit: --protocol must be a clip protocol (what the synthetic writer filters under), got "
                         f"{protocol.name}")
    if args.heldout == args.tau_heldout:
        raise ValueError(f"audit: --heldout {args.heldout} also calibrates τ; false flags must be counted on videos "
                         "that did not set τ (give --tau-heldout the other split)")
    reid, encoder, channels = load_reid_encoder(args.reid, args.vae, device=args.device, command="audit")
    real = EchoNetDataModule(args.real, pad="reflect", channels=channels, size=args.size, batch_size=args.batch_size,
                             num_workers=0, **protocol.data_options())
    real.setup("fit")
    real.setup("test")
    bank, calibration, source = filter_bank(encoder, reid, args.reid, real, protocol,
                                            cache_dir=args.cache_dir or args.out / "reid_cache",
                                            quantile=args.quantile, heldout=args.tau_heldout.lower())
    log.info("audit: protocol %s, τ = %.4g (%s); %d training videos in the bank", protocol.name, calibration.tau,
             source, len(bank))

    def progress(done: int, total: int, held: int, held_total: int) -> None:
        log.info("audit: %d/%d canaries, %d/%d held-out videos scored", done, total, held, held_total)

    heldout_split = {"VAL": "val", "TEST": "test"}[args.heldout]
    result = run_audit(encoder, reid, bank, calibration.tau, protocol, real.datasets["train"].records,
                       heldout_records=real.datasets[heldout_split].records, sources=args.sources, seed=args.seed,
                       size=None if args.size is None else (args.size, args.size), batch_size=args.batch_size,
                       scratch=args.scratch, calibration={**calibration.as_dict(), "source": source},
                       progress=progress)
    summary = result.summary(floor=args.floor, combined_floor=args.combined_floor,
                             max_false_flags=args.max_false_flags)
    summary["heldout_split"] = args.heldout
    write_report(args.out, result, summary, args)
    verdict = "PASSED" if summary["passed"] else "FAILED: " + "; ".join(summary["failures"])
    log.info("audit: %s — least single-transform recall %.3f, combined %.3f, held-out false flags %d/%d → %s",
             args.out, summary["min_single_recall"], summary["combined_recall"],
             summary["heldout_false_flags"]["flagged"], summary["heldout_false_flags"]["videos"], verdict)
    return 0 if summary["passed"] else 1


def write_report(out: Path, result, summary: dict, args: argparse.Namespace) -> None:
    from PIL import Image

    from datamodules.video_io import atomic_output

    out.mkdir(parents=True, exist_ok=True)
    columns = ["Canary", "Kind", "Magnitude", "Source", "Score", "Flagged", "BestIsSource"]
    with atomic_output(out / "audit_scores.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows({**row, "Score": round(row["Score"], 6)} for row in result.canaries)
        writer.writerows({"Canary": f"held-out real {args.heldout}", "Kind": "held-out", "Magnitude": "",
                          "Source": number, "Score": round(score, 6), "Flagged": score > result.tau,
                          "BestIsSource": ""} for number, score in enumerate(result.heldout_scores))
    with atomic_output(out / "audit.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    (out / "figures").mkdir(exist_ok=True)
    with atomic_output(out / "figures" / "audit.png") as tmp:
        Image.fromarray(audit_figure(result)).save(tmp, format="PNG")
    with atomic_output(out / "audit.md") as tmp:
        tmp.write_text(report(summary, args))


def audit_figure(result) -> np.ndarray:
    """Recall per canary (left) and every canary's best score beside the held-out real videos', τ dashed (right)."""
    from matplotlib.figure import Figure

    from callbacks.coverage_figures import render

    recall = result.recall()
    names = list(recall)
    figure = Figure(figsize=(10, 0.28 * len(names) + 1.6), dpi=100, layout="constrained")
    left, right = figure.subplots(1, 2, sharey=True)
    positions = np.arange(len(names))
    left.barh(positions, [recall[name]["recall"] for name in names], color="tab:blue")
    left.set_xlim(0, 1.02)
    left.set_yticks(positions, names, fontsize="small")
    left.invert_yaxis()
    left.set_xlabel("recall (share of canaries above τ)")
    scores = {name: [row["Score"] for row in result.canaries if row["Canary"] == name] for name in names}
    for position, name in zip(positions, names):
        right.scatter(scores[name], np.full(len(scores[name]), position), s=8, alpha=0.6, color="tab:red")
    if result.heldout_scores:
        right.scatter(result.heldout_scores, np.full(len(result.heldout_scores), len(names)), s=8, alpha=0.6,
                      color="tab:green")
        right.set_yticks([*positions, len(names)], [*names, "held-out real"], fontsize="small")
    right.axvline(result.tau, color="black", linestyle="--", label=f"τ = {result.tau:.3g}")
    right.set_xlabel("best re-ID logit against the training set")
    right.legend(fontsize="small")
    figure.suptitle(f"privacy audit, protocol {result.protocol}, {result.sources} source videos")
    return render(figure)


def report(summary: dict, args: argparse.Namespace) -> str:
    false_flags, promised = summary["heldout_false_flags"], summary["promised_false_flags"]
    calibration = summary["calibration"] or {}
    lines = [f"# Privacy audit: {args.reid.name}", "",
             f"**{'Passed' if summary['passed'] else 'Failed'}**"
             + ("" if summary["passed"] else ": " + "; ".join(summary["failures"])) + ".", "",
             f"Canaries of {summary['sources']} training videos of {args.real}, written and read back as the synthetic "
             f"writer does, scored under protocol `{summary['protocol']}` with τ = {summary['tau']:.4g} "
             f"(quantile {calibration.get('quantile')}, {calibration.get('source')}). A canary is caught when its "
             "best score against the training set exceeds τ. 'Own source' counts canaries whose best match is the "
             "video they were made from.", "",
             "| canary | recall | caught / made | own source best |", "|---|---|---|---|"]
    for name, entry in summary["recall"].items():
        lines.append(f"| {name} | {entry['recall']:.3f} | {entry['flagged']} / {entry['canaries']} | "
                     f"{entry['best_is_source']} |")
    low, high = false_flags["interval_95"]
    lines += ["", f"Held-out real {summary['heldout_split']} videos (new patients, not used for τ): "
              f"{false_flags['flagged']} of {false_flags['videos']} flagged = {false_flags['rate']:.3f} "
              f"(95 % interval {low:.3f}–{high:.3f}).", ""]
    if promised:
        lines += [f"τ's promise ({promised['rule']} rule): at quantile {promised['quantile']} from "
                  f"{promised['calibration_videos']} calibration videos, a new real video is flagged with probability "
                  f"at most {promised['mean_at_most']:.3f} on average (nominal {promised['nominal']:.3f}; 90 % interval "
                  f"{promised['interval_90'][0]:.3f}–{promised['interval_90'][1]:.3f}) — few calibration videos make "
                  "its promise loose.", ""]
        if "chance_over_floor" in promised:
            lines += [f"Power of the false-flag check: a filter keeping that promise shows more than "
                      f"{summary['floors']['max_false_flags']:g} on {promised['heldout_videos']} held-out videos "
                      f"with chance {promised['chance_over_floor']:.2f}"
                      + (" — too few videos (calibration or held-out) to tell a good τ from a bad one."
                         if promised["chance_over_floor"] > 0.1 else "."), ""]
    floors = summary["floors"]
    lines += [f"Floors: every single transform ≥ {floors['single']:g}, combined ≥ {floors['combined']:g}, held-out "
              f"false flags ≤ {floors['max_false_flags']:g}.", "", "Per-canary scores: `audit_scores.csv`.", "",
              "![audit](figures/audit.png)", ""]
    return "\n".join(lines)
