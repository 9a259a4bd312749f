"""Command line: ``python -m rxvision_trainer {train,verify,card-append,calibrate-match,convert,camera-changes,
legibility} ...``.

    python -m rxvision_trainer train --data DIR [--val-data DIR] --out BUNDLE_DIR --version X.Y.Z \
        --epochs N --seed S [--size 128] [--device auto|cuda|cpu] [--synth PATH] [--formulary PATH] \
        [--holdout-ndc NDC,...]
    python -m rxvision_trainer verify BUNDLE_DIR
    python -m rxvision_trainer card-append BUNDLE_DIR --section FILE.md
    python -m rxvision_trainer calibrate-match BUNDLE_DIR --scans FILE.csv [--lookalike-budget 0.001] \
        [--unknown-budget 0.005] [--floor 0.9] [--source TEXT]
    python -m rxvision_trainer convert --index TABLE --images DIR --out DIR --file-col C --ndc-col C ...
    python -m rxvision_trainer camera-changes SRC OUT [--changes gamma-0.6,warm,...]
    python -m rxvision_trainer legibility BUNDLE_DIR --data DIR [--impostor-rates 0.01,0.002] [--json]

Exit codes: 0 ok, 1 failed, 2 bad usage (argparse), 65 bad data, 75 training paused at
``--pause-at`` (the ``--checkpoint`` holds the run; the same command goes on).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rxvision_trainer", description="RxVision reference trainer")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    sub = ap.add_subparsers(dest="cmd", required=True)

    from .pipeline import add_train_args
    tr = sub.add_parser("train", help="train, calibrate, quantize and write a bundle")
    add_train_args(tr)

    ve = sub.add_parser("verify", help="check a bundle's files, hashes, contract and ORT self-test")
    ve.add_argument("bundle", type=Path)

    ca = sub.add_parser("card-append", help="append a Markdown section to a bundle's MODEL_CARD.md and re-hash "
                                            "the manifest (facts measured after training)")
    ca.add_argument("bundle", type=Path)
    ca.add_argument("--section", type=Path, required=True, help="Markdown file to append")

    cm = sub.add_parser("calibrate-match", help="choose per-product MATCH thresholds from verification scans "
                                                "(rxvisiond eval --verify --scans) and write them into a bundle")
    cm.add_argument("bundle", type=Path)
    cm.add_argument("--scans", type=Path, required=True, help="CSV of rxvisiond eval --verify --scans")
    cm.add_argument("--lookalike-budget", type=float, default=0.001,
                    help="largest share of look-alike scans answered MATCH on these scans (default 0.001)")
    cm.add_argument("--unknown-budget", type=float, default=0.005,
                    help="largest share of unknown-product scans answered MATCH on these scans (default 0.005)")
    cm.add_argument("--floor", type=float, default=0.9, help="no threshold below this probability (default 0.9)")
    cm.add_argument("--source", default="a calibration set", help="what the scans are, for the model card")

    co = sub.add_parser("convert", help="make a labels.csv dataset from an image index (e.g. NLM C3PI)")
    co.add_argument("--index", type=Path, required=True, help="CSV/TSV with a header: one row per image")
    co.add_argument("--images", type=Path, required=True, help="folder searched (recursively) for the images")
    co.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    co.add_argument("--file-col", required=True, help="index column holding the image file name")
    co.add_argument("--ndc-col", required=True, help="index column holding the NDC (5-4-2 or 11 digits)")
    co.add_argument("--face-col", help="index column naming the face (front/back), if any")
    co.add_argument("--filter-col", help="keep only rows whose value in this column ...")
    co.add_argument("--filter-values", default="", help="... is one of these (comma-separated)")
    co.add_argument("--formulary", type=Path, help="formulary.json for name/strength/group")
    co.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")

    cc = sub.add_parser("camera-changes", help="write a dataset's frames after camera changes the renderer does "
                                               "not make (gamma, colour cast, heavy JPEG, blur, rotation, scale)")
    cc.add_argument("src", type=Path, help="dataset directory (labels.csv)")
    cc.add_argument("out", type=Path, help="writes OUT/<change>/ for each change")
    cc.add_argument("--changes", default="", help="comma-separated (default: all)")

    le = sub.add_parser("legibility", help="how well a bundle tells pill crops from their impostors: the share "
                                           "of genuine crops passing where a given share of impostors passes")
    le.add_argument("bundle", type=Path)
    le.add_argument("--data", type=Path, required=True,
                    help="pill crops cut as the bundle cuts them, with impostors (rxvision-synth dataset "
                         "--pill-crops --impostors N)")
    le.add_argument("--impostor-rates", default="0.01,0.002", help="comma-separated shares (default 0.01,0.002)")
    le.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")

    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from .data import DataError
    from .pipeline import TrainingPaused
    from .train import CheckpointError
    try:
        if args.cmd == "train":
            from .pipeline import run, summary_json
            print(summary_json(run(args)))
        elif args.cmd == "verify":
            from .bundle import verify_bundle
            print(json.dumps(verify_bundle(args.bundle)))
        elif args.cmd == "card-append":
            from .bundle import BundleCheckError, append_card_section
            try:
                section = args.section.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"{args.section}: cannot read the section: {e}") from None
            try:
                print(json.dumps(append_card_section(args.bundle, section)))
            except (BundleCheckError, OSError, ValueError) as e:
                raise DataError(f"{args.bundle}: not a valid bundle, left unchanged: {e}") from None
        elif args.cmd == "calibrate-match":
            from .bundle import BundleCheckError, set_match_thresholds, verify_bundle
            from .match_thresholds import card_section, choose_match_thresholds, rates_at, read_scans, split_check
            for name in ("lookalike_budget", "unknown_budget", "floor"):
                if not 0.0 <= getattr(args, name) <= 1.0:
                    ap.error(f"--{name.replace('_', '-')} must lie in 0..1")
            scans = read_scans(args.scans)
            try:
                verify_bundle(args.bundle, run_selftest=False)
            except (BundleCheckError, OSError, ValueError) as e:
                raise DataError(f"{args.bundle}: not a valid bundle: {e}") from None
            manifest = json.loads((args.bundle / "manifest.json").read_text(encoding="utf-8"))
            min_confidence = manifest["thresholds"]["min_confidence"]
            choice = choose_match_thresholds(scans, min_confidence, args.lookalike_budget, args.unknown_budget,
                                             args.floor)
            uniform = rates_at(scans, lambda _: min_confidence)
            held_out = split_check(scans, min_confidence, args.lookalike_budget, args.unknown_budget, args.floor)
            section = card_section(choice, uniform, min_confidence, args.source, held_out)
            print(section)
            if not choice.feasible:
                print("error: the budgets cannot be met on these scans; the bundle is unchanged", file=sys.stderr)
                return 1
            _, lookalike, unknown = held_out
            if lookalike.rate > 2 * args.lookalike_budget or unknown.rate > 2 * args.unknown_budget:
                print(f"error: thresholds chosen on half of the images do not hold on the other half (false MATCH "
                      f"look-alike {lookalike}, unknown {unknown}; allowed {2 * args.lookalike_budget}, "
                      f"{2 * args.unknown_budget}); the bundle is unchanged", file=sys.stderr)
                return 1
            set_match_thresholds(args.bundle, choice.thresholds, section)
        elif args.cmd == "convert":
            from .data import Formulary, convert_index
            fpath = args.formulary or Formulary.default_path()
            n = convert_index(args.index, args.images, args.out, file_col=args.file_col, ndc_col=args.ndc_col,
                              face_col=args.face_col, filter_col=args.filter_col,
                              filter_values=[v for v in args.filter_values.split(",") if v],
                              formulary=Formulary(fpath) if fpath else None, link=not args.copy)
            print(f"wrote {n} images to {args.out}")
        elif args.cmd == "camera-changes":
            from .camera_changes import CHANGES, write
            changes = [c for c in args.changes.split(",") if c] or list(CHANGES)
            unknown = [c for c in changes if c not in CHANGES]
            if unknown:
                ap.error(f"--changes: unknown {', '.join(unknown)} (one of {', '.join(CHANGES)})")
            for change in changes:
                n = write(args.src, args.out / change, change)
                print(f"{change}: {n} images in {args.out / change}")
        elif args.cmd == "legibility":
            from .legibility import as_json, probe, report
            try:
                rates = [float(r) for r in args.impostor_rates.split(",") if r.strip()]
            except ValueError:
                ap.error(f"--impostor-rates: {args.impostor_rates!r} is not a list of numbers")
            if not rates or not all(0.0 <= r < 1.0 for r in rates):
                ap.error("--impostor-rates: give shares in 0..1 (below 1)")
            rows = probe(args.bundle, args.data, rates)
            print(as_json(rows) if args.json else report(rows))
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 65
    except TrainingPaused as e:
        print(str(e), file=sys.stderr)
        return 75
    return 0


if __name__ == "__main__":
    sys.exit(main())
