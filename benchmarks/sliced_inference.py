"""Sliced inference on large images of small objects: a COCO-format split mosaicked k x k at its images' native scale
into large canvases, evaluated with one pass at the model's input size and with ``eval.slice=[S,S]``
(docs/benchmarks.md, "Test-time augmentation and sliced inference (issue 26)").

    # synthetic val split, 4x4 mosaics (~1100 px); the model: python tools/train.py hydra.run.dir=/tmp/r26/synth_run
    HF_HUB_OFFLINE=1 python benchmarks/sliced_inference.py --images datasets/synthetic_shapes/val \\
        --annotations datasets/synthetic_shapes/annotations/instances_val.json \\
        --weights /tmp/r26/synth_run/checkpoints/last.pth --image-size 256 --grid 4 --mosaics 8 --slice 256 \\
        --variants --tta --out /tmp/r26/slice_synth
    # raccoon val photos, 3x3 mosaics (~1500 px), input 320, two tile sizes
    HF_HUB_OFFLINE=1 python benchmarks/sliced_inference.py --images /work/shared/datasets/raccoon/images \\
        --annotations /tmp/raccoon/val.json --weights /tmp/raccoon/run/checkpoints/last.pth --image-size 320 \\
        --grid 3 --mosaics 9 --slice 400 640 --variants --tta --out /tmp/r26/slice_raccoon

Runs: ``plain`` (the whole canvas resized to the model's input), ``slice S`` (``eval.slice=[S,S]`` with the defaults:
overlap 0.2, the full-image pass, greedy merge at 0.5); ``--variants`` adds ``slice S nms`` (``eval.slice_merge=nms``)
and ``slice S no full`` (``eval.slice_full_image=false``); ``--tta`` adds ``slice S + tta`` (``eval.tta=true``: flip,
wbf), and with ``--variants`` ``slice S nms + tta``.

Each mosaic packs k x k images of the split (drawn by seeded shuffles, each image used equally often) row by row at
their own size onto one canvas filled with the split's mean colour (``--fill grey``: 114); boxes are shifted by the
image's offset, categories kept (``<out>/mosaic/{images/, val.json}``). ``tools/eval.py data=custom`` then runs
once per configuration (the same json as train and val split); ``eval.plots=false``. Reported per run: AP, AP50,
APs (COCO small, area < 32^2 canvas pixels), AR100 (from the run's metrics.json), and two recalls at IoU 0.5
computed with pycocotools from the run's detections json:

* ``R50``: COCOeval with ``params.iouThrs=[0.5]``, recall at maxDets=100, all areas, averaged over the categories;
* ``R50@.05``: ground-truth boxes matched (COCO's greedy matching, per image and category, by decreasing score) by
  a detection scoring >= 0.05, over all ground-truth boxes.

``s/img`` is the evaluation's wall time per image after the model is loaded (from the "evaluating ..." log line to
the process's end: data loading, inference, scoring); ``wall`` the whole process. The table is printed and written to
``<out>/sliced_inference.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

# A script's own folder heads sys.path: put the repository root first, so that `densekit` is this checkout's.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

GREY = (114, 114, 114)


def read_rgb(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # OpenCV applies the EXIF orientation, as densekit's loader
    if image is None:
        raise SystemExit(f"cannot read {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def mosaic_order(num_images: int, per_mosaic: int, num_mosaics: int, seed: int) -> list[list[int]]:
    """Indices of the images of each mosaic: consecutive seeded permutations of all images, cut into groups, so that
    every image is used equally often (give or take one) and no mosaic holds an image twice where avoidable."""
    rng = np.random.default_rng(seed)
    needed = per_mosaic * num_mosaics
    order: list[int] = []
    while len(order) < needed:
        order.extend(int(i) for i in rng.permutation(num_images))
    return [order[m * per_mosaic:(m + 1) * per_mosaic] for m in range(num_mosaics)]


def layout(sizes: list[tuple[int, int]], grid: int) -> tuple[list[tuple[int, int]], int, int]:
    """Top-left ``(x, y)`` of each ``(height, width)`` image packed ``grid`` per row, rows stacked, each row as high as
    its tallest image; and the canvas ``(height, width)``."""
    offsets, y, width = [], 0, 0
    for row in range(0, len(sizes), grid):
        x = 0
        for h, w in sizes[row:row + grid]:
            offsets.append((x, y))
            x += w
        width = max(width, x)
        y += max(h for h, _ in sizes[row:row + grid])
    return offsets, y, width


def build_mosaics(images_dir: Path, annotations: Path, out: Path, grid: int, num_mosaics: int | None = None,
                  seed: int = 0, fill: str = "mean") -> dict[str, Any]:
    """Writes ``out/images/*.png`` and ``out/val.json`` (see the module docstring); returns the COCO dict, with
    ``"placements"`` per mosaic image (``[source image id, x, y]``) kept beside the standard keys."""
    coco = json.loads(Path(annotations).read_text())
    images = sorted(coco["images"], key=lambda im: im["id"])
    if not images:
        raise SystemExit(f"{annotations} has no images")
    per_mosaic = grid * grid
    num_mosaics = num_mosaics or math.ceil(len(images) / per_mosaic)
    by_image: dict[int, list[dict[str, Any]]] = {}
    for ann in coco.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    pixels = {}
    for im in images:
        rgb = read_rgb(Path(images_dir) / im["file_name"])
        if rgb.shape[:2] != (im["height"], im["width"]):
            raise SystemExit(f"{im['file_name']}: decoded {rgb.shape[1]}x{rgb.shape[0]}, the json says "
                             f"{im['width']}x{im['height']}")
        pixels[im["id"]] = rgb
    if fill == "mean":
        colour = tuple(int(round(c)) for c in np.mean([p.reshape(-1, 3).mean(0) for p in pixels.values()], axis=0))
    elif fill == "grey":
        colour = GREY
    else:
        raise SystemExit(f"--fill {fill!r}: mean or grey")
    (out / "images").mkdir(parents=True, exist_ok=True)
    new_images, new_anns, placements = [], [], []
    for m, group in enumerate(mosaic_order(len(images), per_mosaic, num_mosaics, seed)):
        chosen = [images[i] for i in group]
        offsets, height, width = layout([(im["height"], im["width"]) for im in chosen], grid)
        canvas = np.empty((height, width, 3), np.uint8)
        canvas[:] = colour
        image_id = m + 1
        for im, (x, y) in zip(chosen, offsets):
            canvas[y:y + im["height"], x:x + im["width"]] = pixels[im["id"]]
            for ann in by_image.get(im["id"], []):
                bx, by, bw, bh = ann["bbox"]
                new_anns.append({"id": len(new_anns) + 1, "image_id": image_id, "category_id": ann["category_id"],
                                 "bbox": [bx + x, by + y, bw, bh], "area": ann.get("area", bw * bh),
                                 "iscrowd": ann.get("iscrowd", 0)})
        name = f"mosaic_{m:04d}.png"
        cv2.imwrite(str(out / "images" / name), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
        new_images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        placements.append([[im["id"], x, y] for im, (x, y) in zip(chosen, offsets)])
    result = {"images": new_images, "annotations": new_anns, "categories": coco["categories"]}
    (out / "val.json").write_text(json.dumps(result))
    return {**result, "placements": placements, "fill": list(colour)}


def recall_cocoeval(gt_json: Path, detections: list[dict[str, Any]]) -> float:
    """COCOeval recall at IoU 0.5, maxDets=100, all areas, averaged over the categories with ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(gt_json))
    if not detections:
        return 0.0
    ev = COCOeval(gt, gt.loadRes(detections), "bbox")
    ev.params.iouThrs = np.array([0.5])
    ev.evaluate()
    ev.accumulate()
    recall = ev.eval["recall"][0, :, 0, -1]  # [T, K, A, M]: IoU 0.5, every category, area all, maxDets 100
    valid = recall[recall > -1]
    return float(valid.mean()) if valid.size else 0.0


def recall_matched(gt_json: Path, detections: list[dict[str, Any]], min_score: float = 0.05) -> tuple[float, int, int]:
    """Ground-truth boxes matched at IoU >= 0.5 by a detection scoring >= ``min_score`` (COCOeval's matching: per image
    and category, detections by decreasing score, each to the best still-unmatched box); (recall, matched, total)."""
    from pycocotools import mask as mask_utils

    gt = json.loads(Path(gt_json).read_text())
    boxes: dict[tuple[int, int], list[list[float]]] = {}
    for ann in gt["annotations"]:
        if not ann.get("iscrowd", 0):
            boxes.setdefault((ann["image_id"], ann["category_id"]), []).append(ann["bbox"])
    dets: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for det in detections:
        if det["score"] >= min_score:
            dets.setdefault((det["image_id"], det["category_id"]), []).append(det)
    matched = 0
    for key, gts in boxes.items():
        found = sorted(dets.get(key, []), key=lambda d: -d["score"])
        if not found:
            continue
        ious = mask_utils.iou([d["bbox"] for d in found], gts, [0] * len(gts))  # [D, G]
        taken = np.zeros(len(gts), bool)
        for row in np.atleast_2d(ious):
            row = np.where(taken, -1.0, row)
            if row.size and row.max() >= 0.5:
                taken[int(row.argmax())] = True
        matched += int(taken.sum())
    total = sum(len(v) for v in boxes.values())
    return (matched / total if total else 0.0), matched, total


def log_start(log: Path) -> float | None:
    """Epoch time of the last "evaluating ..." line of an eval.log (the model is loaded, the loop starts)."""
    stamps = re.findall(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[densekit\.eval\]\[INFO\] - evaluating ",
                        log.read_text(), flags=re.M)
    return datetime.strptime(stamps[-1], "%Y-%m-%d %H:%M:%S,%f").timestamp() if stamps else None


def evaluate(mosaic: Path, run_dir: Path, args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """One ``tools/eval.py`` run on the mosaics; its metrics, recalls and times."""
    images, ann = mosaic / "images", mosaic / "val.json"
    cmd = [sys.executable, str(ROOT / "tools" / "eval.py"), f"model={args.model}", "data=custom",
           f"data.train_images={images}", f"data.train_annotations={ann}", f"data.val_images={images}",
           f"data.val_annotations={ann}", f"data.image_size={args.image_size}", f"weights={args.weights}",
           "eval.plots=false", *args.eval_arg, *overrides, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    end = time.time()
    if done.returncode != 0:
        raise SystemExit(f"tools/eval.py failed ({done.returncode}):\n{done.stderr[-4000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    detections = json.loads((run_dir / "detections_val.json").read_text())
    num_images = len(json.loads(ann.read_text())["images"])
    loop_start = log_start(run_dir / "eval.log") or start
    r_matched, matched, total = recall_matched(ann, detections, args.min_score)
    return {
        "overrides": overrides, "inference": metrics.get("inference", "plain"),
        "AP": metrics["AP"], "AP50": metrics["AP50"], "APs": metrics["APs"], "AR100": metrics["AR100"],
        "R50": recall_cocoeval(ann, detections), "R50_matched": r_matched, "matched": matched, "gt_boxes": total,
        "detections_per_image": len(detections) / num_images,
        "s_per_image": (end - loop_start) / num_images, "wall_s": end - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="image folder of the split")
    parser.add_argument("--annotations", type=Path, required=True, help="COCO json of the split")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--model", default="efficientdet_lite0")
    parser.add_argument("--image-size", type=int, required=True, help="the model's input side (data.image_size)")
    parser.add_argument("--grid", type=int, default=4, help="k: images per mosaic row and column")
    parser.add_argument("--mosaics", type=int, default=None, help="mosaic count (default: each image once, rounded up)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fill", default="mean", choices=("mean", "grey"))
    parser.add_argument("--slice", type=int, nargs="+", default=[256],
                        help="tile sides S (eval.slice=[S,S]), one run each")
    parser.add_argument("--tta", action="store_true",
                        help="also each slice size with eval.tta=true (flip, wbf; with --variants also merged by nms)")
    parser.add_argument("--variants", action="store_true",
                        help="also each slice size with eval.slice_merge=nms, and with eval.slice_full_image=false")
    parser.add_argument("--min-score", type=float, default=0.05, help="score threshold of R50@.05")
    parser.add_argument("--eval-arg", action="append", default=[], help="an extra tools/eval.py override, every run")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    mosaic = args.out / "mosaic"
    coco = build_mosaics(args.images, args.annotations, mosaic, args.grid, args.mosaics, args.seed, args.fill)
    sides = np.array([[im["height"], im["width"]] for im in coco["images"]])
    wh = np.array([a["bbox"][2:] for a in coco["annotations"]], dtype=float).reshape(-1, 2)
    long_side = {im["id"]: max(im["height"], im["width"]) for im in coco["images"]}
    at_input = np.array([math.sqrt(a["bbox"][2] * a["bbox"][3]) * args.image_size / long_side[a["image_id"]]
                         for a in coco["annotations"]])
    dataset = {
        "source": str(args.annotations), "grid": args.grid, "mosaics": len(coco["images"]),
        "boxes": len(coco["annotations"]), "fill": coco["fill"],
        "canvas_hw_median": [float(v) for v in np.median(sides, 0)], "canvas_hw_max": [int(v) for v in sides.max(0)],
        "box_side_median_canvas_px": float(np.median(np.sqrt(wh.prod(1)))) if len(wh) else None,
        "box_side_median_at_input_px": float(np.median(at_input)) if len(at_input) else None,
        "small_boxes": int(sum(a["area"] < 32 ** 2 for a in coco["annotations"])),
    }
    print(f"mosaics: {json.dumps(dataset)}", flush=True)

    configs = [("plain", [])]
    for s in args.slice:
        configs.append((f"slice {s}", [f"eval.slice=[{s},{s}]"]))
        if args.variants:
            configs.append((f"slice {s} nms", [f"eval.slice=[{s},{s}]", "eval.slice_merge=nms"]))
            configs.append((f"slice {s} no full", [f"eval.slice=[{s},{s}]", "eval.slice_full_image=false"]))
        if args.tta:
            configs.append((f"slice {s} + tta", [f"eval.slice=[{s},{s}]", "eval.tta=true"]))
            if args.variants:
                configs.append((f"slice {s} nms + tta",
                                [f"eval.slice=[{s},{s}]", "eval.slice_merge=nms", "eval.tta=true"]))
    results = {}
    for name, overrides in configs:
        results[name] = evaluate(mosaic, args.out / ("run_" + re.sub(r"\W+", "_", name)), args, overrides)
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    (args.out / "sliced_inference.json").write_text(json.dumps({"dataset": dataset, "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "runs": results}, indent=2))

    print(f"\n{dataset['mosaics']} mosaics of {args.grid}x{args.grid} ({args.annotations.name}), canvas median WxH "
          f"{dataset['canvas_hw_median'][1]:.0f}x{dataset['canvas_hw_median'][0]:.0f} px, {dataset['boxes']} boxes "
          f"(median side {dataset['box_side_median_canvas_px']:.0f} px, "
          f"{dataset['box_side_median_at_input_px']:.1f} px at the {args.image_size} px input)")
    print("| run | AP | AP50 | APs | AR100 | R50 | R50@.05 | dets/img | s/img |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['APs']:.3f} | {r['AR100']:.3f} | {r['R50']:.3f} | "
              f"{r['R50_matched']:.3f} | {r['detections_per_image']:.0f} | {r['s_per_image']:.2f} |")
    print(f"results: {args.out / 'sliced_inference.json'}")


if __name__ == "__main__":
    main()
