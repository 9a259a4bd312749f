"""Command line: ``python -m rxvision_trainer {train,verify,card-append,convert} ...``.

    python -m rxvision_trainer train --data DIR [--val-data DIR] --out BUNDLE_DIR --version X.Y.Z \
        --epochs N --seed S [--size 128] [--device auto|cuda|cpu] [--synth PATH] [--formulary PATH] \
        [--holdout-ndc NDC,...]
    python -m rxvision_trainer verify BUNDLE_DIR
    python -m rxvision_trainer card-append BUNDLE_DIR --section FILE.md
    python -m rxvision_trainer convert --index TABLE --images DIR --out DIR --file-col C --ndc-col C ...
    python -m rxvision_trainer camera-changes SRC OUT [--changes gamma-0.6,warm,...]

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
            from .bundle import append_card_section
            print(json.dumps(append_card_section(args.bundle, args.section.read_text(encoding="utf-8"))))
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
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 65
    except TrainingPaused as e:
        print(str(e), file=sys.stderr)
        return 75
    return 0


if __name__ == "__main__":
    sys.exit(main())
