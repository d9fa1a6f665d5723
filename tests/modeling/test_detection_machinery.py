"""Anchors, target assignment, loss and post-processing checked against efficientdet-pytorch and torchvision."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms, box_iou, nms

import densekit
from densekit.labels import CROWD_LABEL
from densekit.modeling.anchors import AnchorGenerator
from densekit.modeling.box_coder import BoxCoder
from densekit.modeling.matcher import ArgMaxMatcher
from densekit.modeling.postprocess import DetectionPostprocessor, flatten_levels

effdet = pytest.importorskip("effdet")
from effdet.anchors import AnchorLabeler, Anchors  # noqa: E402
from effdet.loss import DetectionLoss as EffdetLoss  # noqa: E402
from effdet import get_efficientdet_config  # noqa: E402


def random_boxes(n: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    h, w = size
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
    wh = (torch.rand(n, 2, generator=g) * 0.5 + 0.02) * torch.tensor([w, h])
    boxes = torch.cat([xy, xy + wh], 1)
    return torch.minimum(boxes, torch.tensor([w, h, w, h], dtype=torch.float32))


@pytest.mark.parametrize("size,max_level,anchor_scale", [((512, 512), 7, 4.0), ((384, 640), 7, 3.0), ((256, 256), 8, 4.0)])
def test_anchors_match_effdet(size, max_level, anchor_scale) -> None:
    ref = Anchors(3, max_level, 3, [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)], anchor_scale, size).boxes  # yxyx
    ours = AnchorGenerator(3, max_level, 3, [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)], anchor_scale)(size)  # xyxy
    assert ours.shape == ref.shape
    assert torch.equal(ours[:, [1, 0, 3, 2]], ref)


def test_box_coder_roundtrip_and_tf_channel_order() -> None:
    anchors = torch.tensor([[10.0, 20.0, 50.0, 100.0]])
    boxes = torch.tensor([[12.0, 30.0, 60.0, 90.0]])
    coder = BoxCoder()
    deltas = coder.encode(boxes, anchors)
    # dy = (60 - 60) / 80 = 0, dx = (36 - 30) / 40: y first, as the TF-ported checkpoints regress.
    assert deltas[0, 0].abs() < 1e-6 and deltas[0, 1] == pytest.approx(6 / 40, abs=1e-6)
    torch.testing.assert_close(coder.decode(deltas, anchors), boxes, atol=1e-4, rtol=0)


def test_target_assignment_and_loss_match_effdet() -> None:
    size = (256, 256)
    cfg = get_efficientdet_config("tf_efficientdet_d0")
    cfg.image_size = size
    cfg.num_classes = 5
    ref_anchors = Anchors.from_config(cfg)
    labeler = AnchorLabeler(ref_anchors, cfg.num_classes, match_threshold=0.5)
    ours_anchors = AnchorGenerator()(size)
    matcher = ArgMaxMatcher(BoxCoder(), 0.5)

    # Two images: 6 random boxes (one tiny, forcing a sub-threshold match) and 2 boxes + padding.
    boxes_a = torch.cat([random_boxes(5, size, 0), torch.tensor([[100.0, 100.0, 104.0, 103.0]])])
    boxes_b = torch.cat([random_boxes(2, size, 1), torch.zeros(4, 4)])
    gt_boxes = torch.stack([boxes_a, boxes_b])
    gt_labels = torch.tensor([[0, 1, 2, 3, 4, 1], [2, 4, -1, -1, -1, -1]])

    cls_t, box_t, num_pos = labeler.batch_label_anchors(gt_boxes[..., [1, 0, 3, 2]], (gt_labels + 1).float().masked_fill(gt_labels < 0, -1))
    targets = matcher(ours_anchors, gt_boxes, gt_labels)
    ref_labels = torch.cat([t.reshape(2, -1) for t in cls_t], 1)
    ref_boxes = torch.cat([t.reshape(2, -1, 4) for t in box_t], 1)
    assert torch.equal(targets.labels, ref_labels)
    torch.testing.assert_close(targets.boxes, ref_boxes, atol=1e-5, rtol=1e-5)
    assert torch.equal(targets.num_positives, num_pos)
    assert (targets.labels[0] == 4).sum() >= 1  # the tiny box got its forced anchor

    g = torch.Generator().manual_seed(3)
    levels = [(size[0] // 2**l, size[1] // 2**l) for l in range(3, 8)]
    cls_out = [torch.randn(2, 9 * 5, h, w, generator=g) for h, w in levels]
    box_out = [torch.randn(2, 9 * 4, h, w, generator=g) * 0.3 for h, w in levels]
    ref_total, ref_cls, ref_box = EffdetLoss(cfg)(cls_out, box_out, cls_t, box_t, num_pos)
    loss = densekit.modeling.losses.DetectionLoss()(flatten_levels(cls_out, 5), flatten_levels(box_out, 4), targets)
    torch.testing.assert_close(loss["loss_cls"], ref_cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss["loss_box"], 50.0 * ref_box, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss["loss_cls"] + loss["loss_box"], ref_total, rtol=1e-5, atol=1e-6)


def test_crowd_regions_are_ignored_not_negative() -> None:
    anchors = AnchorGenerator()((128, 128))
    crowd = torch.tensor([[[0.0, 0.0, 64.0, 64.0]]])
    targets = ArgMaxMatcher(BoxCoder())(anchors, crowd, torch.tensor([[CROWD_LABEL]]))
    on_crowd = box_iou(crowd[0], anchors)[0] >= 0.5
    assert on_crowd.any()
    assert (targets.labels[0, on_crowd] == CROWD_LABEL).all()
    assert targets.num_positives.item() == 0


def test_empty_images_train_with_finite_loss() -> None:
    model = densekit.create_model("efficientdet_d0", num_classes=3, neck={"repeats": 1}, head={"repeats": 1}).train()
    images = torch.rand(2, 3, 128, 128)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    losses = model(images, [empty, {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([2])}])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.head.class_net.predict.conv_pw.weight.grad is not None


def test_hard_nms_is_classwise_torchvision_nms() -> None:
    g = torch.Generator().manual_seed(0)
    anchors = AnchorGenerator(3, 4, 1, [(1.0, 1.0)], 4.0)((64, 64))
    n = anchors.shape[0]
    logits = torch.randn(1, n, 3, generator=g) * 3
    deltas = torch.randn(1, n, 4, generator=g) * 0.1
    post = DetectionPostprocessor(BoxCoder(), pre_nms_top_k=10_000, nms_iou=0.5, max_detections=1000)
    out = post(logits, deltas, anchors, [(64, 64)])[0]
    boxes = BoxCoder().decode(deltas[0], anchors).clamp(0, 64)
    for c in range(3):  # reference: plain torchvision NMS class by class
        ref_keep = nms(boxes, logits[0, :, c].sigmoid(), 0.5)
        mine = out["boxes"][out["labels"] == c]
        torch.testing.assert_close(mine, boxes[ref_keep])
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])


def test_soft_nms_decays_overlaps_instead_of_dropping() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [50.0, 50.0, 60.0, 60.0]])
    logits = torch.tensor([[[3.0], [2.9], [1.0]]])
    deltas = torch.zeros(1, 3, 4)
    hard = DetectionPostprocessor(BoxCoder(), max_detections=10)(logits, deltas, anchors, [(64, 64)])[0]
    soft = DetectionPostprocessor(BoxCoder(), max_detections=10, soft_nms=True, soft_nms_sigma=0.5)(logits, deltas, anchors, [(64, 64)])[0]
    assert len(hard["scores"]) == 2  # the 0.9-IoU duplicate is suppressed
    assert len(soft["scores"]) == 3
    iou = 0.9
    expected = torch.sigmoid(torch.tensor(2.9)) * torch.exp(torch.tensor(-(iou**2) / (2 * 0.5)))  # TF's Gaussian
    assert soft["scores"][-1] == pytest.approx(expected.item(), rel=1e-4)
    assert torch.all(soft["scores"][:-1] >= soft["scores"][1:])


def test_odd_input_size_is_padded_and_boxes_stay_inside_the_image() -> None:
    model = densekit.create_model("efficientdet_d0", num_classes=4, neck={"repeats": 1}, head={"repeats": 1}).eval()
    with torch.no_grad():
        out = model([torch.rand(3, 100, 150), torch.rand(3, 130, 90)])
    for det, (h, w) in zip(out, [(100, 150), (130, 90)]):
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) <= 100
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all()
        assert (det["labels"] < 4).all()


def test_bad_inputs_get_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown model 'efficientdet_d9'.*efficientdet_d0"):
        densekit.create_model("efficientdet_d9")
    with pytest.raises(ValueError, match="neck"):
        densekit.create_model("efficientdet_d0", neck={"chanels": 32})
    model = densekit.create_model("efficientdet_d0", num_classes=2, neck={"repeats": 1}, head={"repeats": 1})
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match="label 5 out of range for a 2-class model"):
        model.train()(torch.rand(1, 3, 64, 64), [{"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]]), "labels": torch.tensor([5])}])


@pytest.mark.parametrize("num_anchors,k", [(500, 100), (50, 100)], ids=["bounded", "k>=anchors-fallback"])
@pytest.mark.parametrize("per_level", [False, True], ids=["flat", "per-level"])
@pytest.mark.parametrize("traceable", [False, True], ids=["shortcut", "traceable"])
def test_topk_pairs_equals_a_full_sort(num_anchors: int, k: int, per_level: bool, traceable: bool) -> None:
    from densekit.modeling.postprocess import topk_pairs

    logits = torch.randn(3, num_anchors, 7, generator=torch.Generator().manual_seed(0))  # distinct values: no ties
    ref_values, ref_idx = logits.reshape(3, -1).topk(k, dim=1)
    # Per level: uneven splits, one of them empty, standing for the concatenation (indices are global).
    cuts = [0, num_anchors // 2, num_anchors // 2, num_anchors - 3, num_anchors]
    levels = [logits[:, a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    values, idx = topk_pairs(levels if per_level else logits, k, traceable=traceable)
    assert torch.equal(values, ref_values) and torch.equal(idx, ref_idx)


def test_nms_on_a_score_prefix_equals_nms_on_all_candidates() -> None:
    """Image 0 keeps its 20 detections within the first 80 candidates; image 1's candidates mostly suppress each
    other (every box near one of 3 places), so its prefix has to widen to all 1000: both must equal full NMS."""
    g = torch.Generator().manual_seed(0)
    anchors = AnchorGenerator(3, 4, 1, [(1.0, 1.0)], 4.0)((128, 128))
    n = anchors.shape[0]
    logits = torch.randn(2, n, 5, generator=g) * 3
    deltas = torch.randn(2, n, 4, generator=g) * 0.1
    # Image 1: every anchor regresses onto one of three 40-px boxes (tiny jitter), so NMS keeps at most 3 x 5 boxes.
    centres = torch.tensor([[30.0, 30.0], [64.0, 90.0], [100.0, 40.0]])[torch.arange(n) % 3]
    target = torch.cat([centres - 20, centres + 20], 1) + torch.rand(n, 4, generator=g)
    deltas[1] = BoxCoder().encode(target, anchors)
    post = DetectionPostprocessor(BoxCoder(), pre_nms_top_k=1000, nms_iou=0.5, max_detections=20)
    out = post(logits, deltas, anchors, [(128, 128)] * 2)
    for b in range(2):
        values, idx = logits[b].reshape(-1).topk(1000)
        boxes = BoxCoder().decode(deltas[b, idx // 5], anchors[idx // 5]).clamp(0, 128)
        keep = batched_nms(boxes, values.sigmoid(), idx % 5, 0.5)[:20]
        torch.testing.assert_close(out[b]["boxes"], boxes[keep])
        assert torch.equal(out[b]["labels"], idx[keep] % 5)
    assert len(out[0]["scores"]) == 20 and len(out[1]["scores"]) <= 15


def test_topk_pairs_with_mass_ties_keeps_the_top_values() -> None:
    """bf16 logits or an untrained head's constant prior: most values tie at the cut-off. The k values must equal a
    full sort's (which tied pairs are kept is arbitrary, as with any top-k), indices must point at those values."""
    from densekit.modeling.postprocess import topk_pairs

    g = torch.Generator().manual_seed(0)
    logits = torch.full((2, 3000, 9), -4.595)
    logits[:, :40] += torch.rand(2, 40, 9, generator=g)  # a few anchors stand out; everything else ties
    logits = logits.to(torch.bfloat16)
    values, idx = topk_pairs([logits[:, :1000], logits[:, 1000:]], 500)
    ref_values = logits.reshape(2, -1).topk(500, dim=1).values
    assert torch.equal(values, ref_values)
    assert torch.equal(logits.reshape(2, -1).gather(1, idx), values)
    assert all(len(set(row.tolist())) == 500 for row in idx)  # no pair twice


@pytest.mark.parametrize("name", ["efficientdet_d0", "lraspp_mobilenet_v3_small"])
def test_nan_or_inf_pixels_are_refused_naming_the_image(name: str) -> None:
    model = densekit.create_model(name, num_classes=3, image_size=[64, 64]).eval()
    images = torch.rand(2, 3, 64, 64)
    images[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] of the batch contain NaN or inf"):
        model(images)
    listed = [torch.rand(3, 64, 64), torch.full((3, 32, 32), float("inf"))]
    with pytest.raises(ValueError, match=r"image\(s\) \[1\]"):  # a list is checked image by image
        model(listed)


def test_gpu_path_of_postprocessing_copies_nothing_to_the_host_and_gives_the_cpu_result(
    monkeypatch: pytest.MonkeyPatch, host_reads
) -> None:
    """On a GPU the top-k gathers the chosen anchors from the concatenated levels instead of reading the level split
    points on the host (``split_on_host``). Forced here on the CPU: the detections must be the CPU path's exactly,
    and no tensor data may be copied to the host (``.item()``, ``.tolist()``, ``.cpu()``, ...)."""
    from densekit.modeling import postprocess

    g = torch.Generator().manual_seed(0)
    anchor_gen = AnchorGenerator(3, 5, 3, [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)], 4.0)
    anchors = anchor_gen((128, 128))
    sizes = [16 * 16 * 9, 8 * 8 * 9, 4 * 4 * 9]  # P3-P5 anchors of a 128 px input
    logits = torch.randn(2, anchors.shape[0], 6, generator=g) * 2
    deltas = torch.randn(2, anchors.shape[0], 4, generator=g) * 0.1
    levels = list(logits.split(sizes, 1))
    post = DetectionPostprocessor(BoxCoder(), pre_nms_top_k=300, max_detections=50)
    on_host = post(levels, deltas, anchors, [(128, 128), (100, 120)])
    monkeypatch.setattr(postprocess, "split_on_host", lambda device: False)
    with host_reads(device="any") as reads:
        on_device = post(levels, deltas, anchors, [(128, 128), (100, 120)])
    assert reads.calls == []
    for a, b in zip(on_host, on_device):
        assert all(torch.equal(a[key], b[key]) for key in ("boxes", "scores", "labels"))
    assert len(on_host[0]["scores"]) == 50
