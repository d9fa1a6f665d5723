"""The box merges of TTA and sliced inference, against hand-computed results."""
from __future__ import annotations

import pytest
import torch

from densekit.inference.merge import concat_detections, greedy_merge, merge_detections, nms_merge, weighted_box_fusion


def dets(boxes, scores, labels) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.long)}


def test_weighted_box_fusion_averages_by_score_and_down_weights_boxes_few_passes_found() -> None:
    first = dets([[0, 0, 10, 10], [50, 50, 60, 60]], [0.9, 0.8], [0, 0])
    second = dets([[1, 1, 11, 11], [0, 0, 10, 10]], [0.6, 0.7], [0, 1])  # IoU 0.68 with the first's; another class
    out = weighted_box_fusion(concat_detections([first, second]), iou_threshold=0.55, num_passes=2, max_detections=10)
    # cluster 1: (0.9 * [0,0,10,10] + 0.6 * [1,1,11,11]) / 1.5, score mean(0.9, 0.6) * 2/2; the others alone: * 1/2
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.4, 0.4, 10.4, 10.4], [50, 50, 60, 60], [0, 0, 10, 10]]))
    torch.testing.assert_close(out["scores"], torch.tensor([0.75, 0.4, 0.35]))
    assert out["labels"].tolist() == [0, 0, 1]


def test_weighted_box_fusion_keeps_the_best_and_separates_low_overlap() -> None:
    boxes = [[0, 0, 10, 10], [6, 0, 16, 10]]  # IoU 4/16 = 0.25: two objects
    out = weighted_box_fusion(dets(boxes, [0.5, 0.9], [0, 0]), iou_threshold=0.55, num_passes=1, max_detections=1)
    assert out["boxes"].tolist() == [[6, 0, 16, 10]] and out["scores"].tolist() == pytest.approx([0.9])


def test_nms_merge_is_class_wise_and_sorted() -> None:
    out = nms_merge(dets([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10]], [0.6, 0.9, 0.7], [0, 0, 1]), 0.5, 10)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7]) and out["labels"].tolist() == [0, 1]


def test_greedy_merge_joins_a_seam_cut_part_into_the_whole_object() -> None:
    whole = dets([[490, 100, 530, 140]], [0.8], [0])  # the tile that saw the object whole
    part = dets([[490, 100, 512, 140], [300, 300, 320, 320]], [0.9, 0.5], [0, 0])  # the neighbour saw it cut at x=512
    out = greedy_merge(concat_detections([whole, part]), threshold=0.5, max_detections=10)
    assert out["boxes"].tolist() == [[490, 100, 530, 140], [300, 300, 320, 320]]
    assert out["scores"].tolist() == pytest.approx([0.9, 0.5])  # the merged box keeps its best member's score


def test_greedy_merge_keeps_nested_boxes_of_one_pass_classes_apart_and_iou_is_stricter() -> None:
    big, small = [0, 0, 100, 100], [10, 10, 30, 30]
    one_pass = concat_detections([dets([big, small], [0.9, 0.8], [0, 0])])
    assert len(greedy_merge(one_pass, 0.5, 10)["scores"]) == 2  # the model's NMS kept both: two objects
    other_class = concat_detections([dets([big], [0.9], [0]), dets([small], [0.8], [1])])
    assert len(greedy_merge(other_class, 0.5, 10)["scores"]) == 2
    halves = concat_detections([dets([[0, 0, 50, 40]], [0.9], [0]), dets([[0, 0, 100, 40]], [0.8], [0])])
    assert len(greedy_merge(halves, 0.5, 10, metric="ios")["scores"]) == 1
    assert len(greedy_merge(halves, 0.6, 10, metric="iou")["scores"]) == 2  # IoU 0.5
    with pytest.raises(ValueError, match="unknown match metric"):
        greedy_merge(halves, 0.5, 10, metric="giou")


def test_merge_detections_names_the_choices() -> None:
    with pytest.raises(ValueError, match="wbf, nms, greedy"):
        merge_detections(dets([], [], []), "soft", 0.5, 1, 10)
    empty = merge_detections(concat_detections([dets([], [], [])]), "greedy", 0.5, 1, 10)
    assert empty["boxes"].shape == (0, 4)


def test_greedy_merge_keeps_uncut_tile_boxes_inside_a_coarse_full_image_box() -> None:
    full = dets([[0, 0, 100, 50]], [0.9], [0])  # the downscaled full-image pass: one box over two objects
    tile = dets([[2, 2, 40, 45], [60, 2, 98, 45]], [0.8, 0.85], [0, 0])  # a tile saw both whole
    det = concat_detections([{**full, "cut": torch.tensor([False])}, {**tile, "cut": torch.tensor([False, False])}])
    out = greedy_merge(det, threshold=0.5, max_detections=10)
    assert len(out["boxes"]) == 3 and [2, 2, 40, 45] in out["boxes"].tolist()  # not swallowed: NMS rule (IoU < 0.5)
    cut_part = dets([[60, 2, 80, 45]], [0.7], [0])  # the neighbour tile saw the right object cut at x=80
    det = concat_detections([{**tile, "cut": torch.tensor([False, False])}, {**cut_part, "cut": torch.tensor([True])}])
    assert greedy_merge(det, threshold=0.5, max_detections=10)["boxes"].tolist() == [[60, 2, 98, 45], [2, 2, 40, 45]]


def test_greedy_merge_does_not_grow_into_a_much_weaker_box() -> None:
    strong = {**dets([[10, 10, 30, 30]], [0.9], [0]), "cut": torch.tensor([True])}
    weak = {**dets([[0, 0, 200, 200]], [0.05], [0]), "cut": torch.tensor([False])}  # junk around it
    out = greedy_merge(concat_detections([strong, weak]), threshold=0.5, max_detections=10)
    assert out["boxes"].tolist() == [[10, 10, 30, 30]]  # the junk is taken, not joined
