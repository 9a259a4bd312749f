#!/usr/bin/env python3
"""Check models/formulary/formulary.json against the rules in README.md.

Usage: check_formulary.py [PATH] [--markdown]

Prints a summary (or, with --markdown, the look-alike table for README.md) and
exits 1 if any rule is broken. Standard library only.
"""

import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

PRODUCT_KEYS = [
    "ndc", "name", "strength", "dosage_form", "shape", "colors", "color_rgb",
    "imprint", "imprint_style", "imprint_color_rgb", "score", "score_face",
    "size_mm", "thickness_mm", "lookalike_group", "illustrative",
]
# FDA SPL shape words (lower case); "oblong" (caplet: parallel sides, round ends)
# and "shield" are the two additions this formulary makes, see README.md.
SHAPES = {
    "round", "oval", "oblong", "capsule", "triangle", "diamond", "rectangle",
    "square", "pentagon", "hexagon", "heptagon", "octagon", "teardrop", "shield",
    "bullet", "clover", "double circle", "freeform", "gear", "semi-circle", "trapezoid",
}
# The twelve FDA SPL colour words.
COLORS = {
    "white", "yellow", "orange", "red", "pink", "purple", "blue", "green",
    "brown", "gray", "black", "turquoise",
}
NDC = re.compile(r"^\d{5}-\d{4}-\d{2}$")
GROUP = re.compile(r"^LA\d{2}$")

MIN_PRODUCTS, MIN_GROUPS, MIN_CAPSULES = 60, 10, 8


def check(doc):
    errs = []
    if list(doc) != ["schema_version", "source_note", "products"]:
        errs.append(f"top-level keys {list(doc)}")
    if doc.get("schema_version") != 1:
        errs.append("schema_version must be 1")
    if not str(doc.get("source_note", "")).strip():
        errs.append("source_note is empty")
    products = doc.get("products", [])
    seen = set()
    for i, p in enumerate(products):
        tag = f"product {i} ({p.get('ndc')})"
        e = lambda msg: errs.append(f"{tag}: {msg}")  # noqa: E731
        if list(p) != PRODUCT_KEYS:
            e(f"keys {list(p)} != {PRODUCT_KEYS}")
            continue
        if not NDC.match(p["ndc"]):
            e("ndc is not 5-4-2")
        if p["ndc"] in seen:
            e("duplicate ndc")
        seen.add(p["ndc"])
        for k in ("name", "strength", "dosage_form"):
            if not isinstance(p[k], str) or not p[k].strip():
                e(f"{k} is empty")
        is_cap = p["dosage_form"].startswith("capsule")
        if not (is_cap or p["dosage_form"].startswith("tablet")):
            e(f"dosage_form {p['dosage_form']!r}")
        if p["shape"] not in SHAPES:
            e(f"shape {p['shape']!r} not in vocabulary")
        if is_cap != (p["shape"] == "capsule"):
            e("shape 'capsule' is for capsules only (caplets are 'oblong')")
        cols, rgbs = p["colors"], p["color_rgb"]
        if not 1 <= len(cols) <= 2 or any(c not in COLORS for c in cols):
            e(f"colors {cols}")
        if len(cols) == 2 and not is_cap:
            e("two colours only for two-tone capsules")
        if len(rgbs) != len(cols) or not all(_rgb(c) for c in rgbs):
            e("color_rgb must hold one [r,g,b] per colour")
        imp = p["imprint"]
        if list(imp) != ["front", "back"] or not all(isinstance(v, str) for v in imp.values()):
            e("imprint must be {front, back} strings")
        elif not (imp["front"] or imp["back"]):
            e("no imprint on either face")
        style, ink = p["imprint_style"], p["imprint_color_rgb"]
        if style not in ("debossed", "printed"):
            e(f"imprint_style {style!r}")
        if (style == "printed") != (ink is not None) or (ink is not None and not _rgb(ink)):
            e("imprint_color_rgb must be an [r,g,b] for printed and null for debossed")
        if p["score"] not in (1, 2, 3, 4):
            e(f"score {p['score']}")
        if (p["score"] == 1) != (p["score_face"] is None):
            e("score_face must be null exactly when score is 1")
        if p["score_face"] not in (None, "front", "back", "both"):
            e(f"score_face {p['score_face']!r}")
        if is_cap and p["score"] != 1:
            e("capsules are not scored")
        size, th = p["size_mm"], p["thickness_mm"]
        if len(size) != 2 or not all(_num(x) and x > 0 for x in size) or size[0] < size[1]:
            e(f"size_mm {size} must be [length, width] with length >= width")
        elif p["shape"] == "round" and size[0] != size[1]:
            e("round tablets have length == width")
        elif not (4.0 <= size[0] <= 23.0 if not is_cap else 11.0 <= size[0] <= 27.0):
            e(f"length {size[0]} mm is outside the realistic range")
        if not _num(th) or th <= 0 or (len(size) == 2 and th > size[1] + 1e-9 and not is_cap):
            e(f"thickness_mm {th}")
        if is_cap and len(size) == 2 and th != size[1]:
            e("a capsule's thickness is its diameter")
        g = p["lookalike_group"]
        if g is not None and not (isinstance(g, str) and GROUP.match(g)):
            e(f"lookalike_group {g!r}")
        if not isinstance(p["illustrative"], bool):
            e("illustrative must be a bool")
    if errs:
        return errs, None

    # Look-alike groups are exactly the classes of (shape, colours) with two or more products.
    by_look = defaultdict(list)
    for p in products:
        by_look[(p["shape"], tuple(p["colors"]))].append(p)
    groups = defaultdict(list)
    for p in products:
        if p["lookalike_group"]:
            groups[p["lookalike_group"]].append(p)
    for look, members in by_look.items():
        ids = {m["lookalike_group"] for m in members}
        if len(members) == 1 and ids != {None}:
            errs.append(f"{members[0]['ndc']}: alone in its look {look} but in group {ids}")
        if len(members) > 1 and (len(ids) != 1 or None in ids):
            errs.append(f"look {look} is split across groups {sorted(map(str, ids))}")
    for gid, members in groups.items():
        if len({(m["shape"], tuple(m["colors"])) for m in members}) != 1:
            errs.append(f"{gid} mixes looks")
    # No two products may be indistinguishable.
    def appearance(p):
        return (p["shape"], tuple(p["colors"]), p["imprint"]["front"], p["imprint"]["back"],
                p["imprint_style"], p["score"], tuple(p["size_mm"]))
    for look, n in Counter(map(appearance, products)).items():
        if n > 1:
            errs.append(f"{n} products look identical: {look}")

    shapes = Counter(p["shape"] for p in products)
    capsules = [p for p in products if p["dosage_form"].startswith("capsule")]
    if len(products) < MIN_PRODUCTS:
        errs.append(f"{len(products)} products < {MIN_PRODUCTS}")
    if len(groups) < MIN_GROUPS:
        errs.append(f"{len(groups)} look-alike groups < {MIN_GROUPS}")
    if len(capsules) < MIN_CAPSULES:
        errs.append(f"{len(capsules)} capsules < {MIN_CAPSULES}")
    for need in (("triangle",), ("diamond",), ("rectangle",), ("pentagon", "hexagon")):
        if not any(shapes[s] for s in need):
            errs.append(f"no product with shape {' or '.join(need)}")
    stats = {"products": products, "groups": groups, "shapes": shapes, "capsules": capsules}
    return errs, stats


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _rgb(c):
    return isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)


def _look(p):
    return f"{'/'.join(p['colors'])} {p['shape']}"


def markdown(groups):
    rows = ["| Group | Shared look | Members (name, strength: imprint front / back, score, size mm) |",
            "|---|---|---|"]
    for gid in sorted(groups):
        members = groups[gid]
        cells = []
        for m in members:
            imp = " / ".join(f"`{v}`" if v else "blank" for v in m["imprint"].values())
            score = {1: "unscored", 2: "bisect", 3: "trisect", 4: "quadrisect"}[m["score"]]
            size = "×".join(f"{x:g}" for x in m["size_mm"])
            cells.append(f"{m['name']} {m['strength']}: {imp}, {score}, {size}")
        rows.append(f"| {gid} | {_look(members[0])} | {'<br>'.join(cells)} |")
    return "\n".join(rows)


def main(argv):
    args = [a for a in argv if not a.startswith("--")]
    path = Path(args[0]) if args else Path(__file__).with_name("formulary.json")
    doc = json.loads(path.read_text())
    errs, st = check(doc)
    if errs:
        for e in errs:
            print(f"error: {e}", file=sys.stderr)
        print(f"{path}: {len(errs)} rule(s) broken", file=sys.stderr)
        return 1
    if "--markdown" in argv:
        print(markdown(st["groups"]))
        return 0
    products, groups = st["products"], st["groups"]
    two_tone = sum(len(p["colors"]) == 2 for p in st["capsules"])
    illus = sum(p["illustrative"] for p in products)
    print(f"{path}: ok")
    print(f"  products     {len(products)} ({illus} illustrative, {len(products) - illus} recalled)")
    print(f"  capsules     {len(st['capsules'])} ({two_tone} two-tone)")
    print(f"  groups       {len(groups)} covering {sum(map(len, groups.values()))} products")
    print("  shapes       " + ", ".join(f"{s} {n}" for s, n in sorted(st["shapes"].items())))
    for gid in sorted(groups):
        m = groups[gid]
        print(f"  {gid}  {_look(m[0]):<22} {len(m):>2}  " + ", ".join(f"{x['name'].split()[0]} {x['strength']}" for x in m))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
