"""Multi-scale / flip segmentation inference averages the softmax of every view at the input resolution."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import densekit
from densekit.evaluation.loop import predict_segmentation


def test_multiscale_flip_prediction_averages_views() -> None:
    torch.manual_seed(0)
    model = densekit.create_model("lraspp_mobilenet_v3_small").eval()
    images = torch.rand(2, 3, 64, 128)
    with torch.no_grad():
        plain = predict_segmentation(model, images)
        assert [p.shape for p in plain] == [torch.Size([64, 128])] * 2
        assert torch.equal(plain[0], model.forward_raw(images)[0].argmax(0))

        tta = predict_segmentation(model, images, scales=(0.5, 1.0), flip=True)
        views = []
        for scale in (0.5, 1.0):
            x = F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False) if scale != 1.0 else images
            for flipped in (False, True):
                logits = model.forward_raw(x.flip(-1) if flipped else x)
                logits = logits.flip(-1) if flipped else logits
                views.append(F.interpolate(logits, size=(64, 128), mode="bilinear", align_corners=False).softmax(1))
        expected = torch.stack(views).sum(0).argmax(1)
    assert torch.equal(torch.stack(tta), expected)
    assert tta[0].min() >= 0 and tta[0].max() < 19
