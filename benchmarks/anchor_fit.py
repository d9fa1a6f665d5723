"""What anchors fitted to the data do to AP: EfficientDet-Lite0 on elongated objects, default anchors against the
anchors ``densekit inspect`` suggests, same run length (docs/benchmarks.md, "Anchors fitted to the data (issue 25)").

    python benchmarks/anchor_fit.py                      # 240 train / 40 val images, 7 epochs per run
    python benchmarks/anchor_fit.py --epochs 3 --out /tmp/anchor_fit

densekit's synthetic shapes have aspect ratios of 0.75-1.33 only (densekit/data/synthetic.py), so this script draws
its own COCO-format dataset with OpenCV: 256x256 images of 1-4 bars of about 1:6 or 6:1 (long side 70-220 px), two
classes by colour, on a textured background. It then fits anchors to the training boxes
(:func:`densekit.modeling.anchor_fit.fit_anchors`, what ``densekit inspect`` prints in its "anchors" section) and runs
``tools/train.py data=custom`` twice, once with the model's anchors and once with the suggested overrides, with the
same recipe, seed and steps, and prints AP / AP50 of both (``<out>/anchor_fit.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# A script's own folder heads sys.path: put the repository root first, so that `densekit` is this checkout's.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from densekit.modeling.anchor_fit import (  # noqa: E402
    AnchorGeometry, anchor_recall, boxes_at_input_size, fit_anchors, format_anchor_fit,
)
from densekit.modeling.build import load_model_config  # noqa: E402

SIZE = 256
CLASSES = ((1, "red_bar", (220, 50, 40)), (2, "blue_bar", (40, 80, 225)))
MODEL = "efficientdet_lite0"


def draw_split(folder: Path, count: int, seed: int) -> dict[str, Any]:
    """``count`` images of bars under ``folder`` and their COCO dict."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        base = rng.uniform(80, 170)
        noise = cv2.resize(rng.normal(0, 1, (SIZE // 16, SIZE // 16, 1)).astype(np.float32), (SIZE, SIZE))
        image = np.clip(base + 18 * noise[..., None] + rng.normal(0, 5, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        placed: list[tuple[float, float, float, float]] = []
        for _ in range(int(rng.integers(1, 5))):
            long = float(np.exp(rng.uniform(np.log(70), np.log(220))))
            short = long / (6.0 * rng.uniform(0.9, 1.1))
            w, h = (long, short) if rng.random() < 0.5 else (short, long)
            for _attempt in range(20):  # no overlaps: every bar fully visible
                x, y = rng.uniform(0, SIZE - w), rng.uniform(0, SIZE - h)
                if all(x + w <= a or a + c <= x or y + h <= b or b + d <= y for a, b, c, d in placed):
                    break
            else:
                continue
            placed.append((x, y, w, h))
            cat_id, _, colour = CLASSES[int(rng.integers(len(CLASSES)))]
            rgb = np.clip(np.asarray(colour) + rng.normal(0, 12, 3), 0, 255)
            x0, y0, x1, y1 = round(x), round(y), round(x + w), round(y + h)
            image[y0:y1, x0:x1] = rgb.astype(np.uint8)
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": cat_id,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
        name = f"{index:05d}.png"
        cv2.imwrite(str(folder / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append({"id": index + 1, "file_name": name, "height": SIZE, "width": SIZE})
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": n} for c, n, _ in CLASSES]}


def write_dataset(root: Path, num_train: int, num_val: int) -> dict[str, Path]:
    paths = {}
    for split, count, seed in (("train", num_train, 0), ("val", num_val, 1)):
        coco = draw_split(root / split, count, seed)
        (root / f"{split}.json").write_text(json.dumps(coco))
        paths[split] = root / f"{split}.json"
    return paths


def train(root: Path, run: Path, epochs: int, extra: list[str]) -> tuple[dict[str, Any], float, str]:
    """``tools/train.py`` on the bars; returns the final metrics, the wall time and the log."""
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), f"model={MODEL}", "data=custom",
           f"data.train_images={root / 'train'}", f"data.train_annotations={root / 'train.json'}",
           f"data.val_images={root / 'val'}", f"data.val_annotations={root / 'val.json'}", f"data.image_size={SIZE}",
           "data.augment.scale_range=[0.6,1.4]", "train=synthetic", f"train.epochs={epochs}", "train.seed=0",
           f"hydra.run.dir={run}", *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"training failed ({done.returncode}):\n{done.stderr[-4000:]}")
    metrics = json.loads((run / "metrics.json").read_text())["final"]
    return metrics, seconds, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--train-images", type=int, default=240)
    parser.add_argument("--val-images", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=7)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="anchor_fit_"))
    paths = write_dataset(out / "bars", args.train_images, args.val_images)

    model_cfg = load_model_config(MODEL)
    boxes = boxes_at_input_size(json.loads(paths["train"].read_text()), SIZE)
    fit = fit_anchors(boxes, model_cfg, SIZE)
    print("\n".join(format_anchor_fit(fit)), flush=True)
    best = fit.recommended
    if best is None:
        raise SystemExit("the default anchors fit these boxes: nothing to compare")
    val_boxes = boxes_at_input_size(json.loads(paths["val"].read_text()), SIZE)
    geometry = AnchorGeometry.of(model_cfg, SIZE)

    results = {}
    for name, setting, extra in (("default", fit.current.setting, []),
                                 ("fitted", best.setting, best.setting.overrides())):
        metrics, seconds, output = train(out / "bars", out / f"run_{name}", args.epochs, extra)
        results[name] = {
            "overrides": extra, "anchors_per_location": setting.anchors_per_location,
            "train_recall": anchor_recall(boxes, setting, geometry),
            "val_recall": anchor_recall(val_boxes, setting, geometry),
            "AP": metrics["AP"], "AP50": metrics["AP50"], "AP75": metrics.get("AP75"), "minutes": seconds / 60,
            "train_warned": "anchor recall" in output,
        }
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    (out / "anchor_fit.json").write_text(json.dumps(results, indent=2))
    print("\n| anchors | per location | recall train / val | AP | AP50 | AP75 | minutes |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['anchors_per_location']} | {r['train_recall']:.3f} / {r['val_recall']:.3f} | "
              f"{r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | {r['minutes']:.1f} |")
    print(f"results: {out / 'anchor_fit.json'}")


if __name__ == "__main__":
    main()
