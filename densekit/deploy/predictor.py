"""``densekit.Predictor``: a model and its weights, ready to run on photos, in a notebook or behind tools/predict.py.

::

    predictor = densekit.Predictor("efficientdet_d0", weights="run/checkpoints/last.pth", score_threshold=0.4)
    det = predictor("photo.jpg")            # Detections: boxes (xyxy, photo pixels), scores, labels, names
    seg = densekit.Predictor("lraspp_mobilenet_v3_large", weights="lraspp.pth")(rgb_array)   # SegmentationMap

Preprocessing is the task's evaluation transform (:meth:`densekit.tasks.Task.inference`), so the numbers on a
user's photo are made the way the metrics are, and results come back in the photo's own pixels.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint.convert import load_state_dict_any
from ..checkpoint.weights import read_model_weights
from ..config import image_size_arg
from ..data.decode import read_image
from ..labels import class_names_of
from ..modeling.model_spec import model_spec
from ..data.transforms import keep_original_size
from ..inference.slicing import SliceSettings, tile_size
from ..inference.tta import TTASettings
from ..inference.wrappers import check_applicable, describe, wrap_detector
from .formats import artifact_of, convert_model, is_artifact, load_artifact_model
from .optimize import optimize_for_inference
from .predictions import DetectionInference, Detections, Prediction

log = logging.getLogger(__name__)

#: An image a :class:`Predictor` takes: a file path, an RGB array ``[H, W, 3]`` (uint8, or float in [0, 1]), or a
#: tensor ``[3, H, W]`` (uint8, or float in [0, 1]) as the models take it.
ImageInput = str | os.PathLike | np.ndarray | torch.Tensor


def to_rgb_uint8(image: ImageInput, name: str) -> np.ndarray:
    """``image`` as the ``uint8 RGB [H, W, 3]`` array the evaluation transforms take; ``name`` is quoted in errors.

    Raises:
        FileNotFoundError / OSError: a path that does not exist or does not decode (named).
        ValueError: a wrong shape, NaN or infinite values, or float values outside [0, 1].
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"{name}: expected a tensor [3, H, W], got {list(image.shape)}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected a path, an RGB array [H, W, 3] or a tensor [3, H, W], got {type(image).__name__}"
                         + (f" {list(image.shape)}" if hasattr(image, "shape") else ""))
    if image.dtype == np.uint8:
        return image
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"{name}: expected uint8 or float pixels, got {image.dtype}")
    bad = ~np.isfinite(image)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} NaN or infinite pixel values: check how it was decoded / "
                         f"preprocessed (the models need finite RGB values in [0, 1] or uint8 0-255)")
    lo, hi = float(image.min()), float(image.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name}: float pixels must lie in [0, 1], got {lo:g}..{hi:g} (pass uint8 0-255 instead)")
    return np.round(image * 255.0).astype(np.uint8)


def load_model(model: str | Any, weights: str | os.PathLike | None, prefer_ema: bool = True, **overrides: Any) -> nn.Module:
    """A model by name (``conf/model``), from a model config, or as given, with ``weights`` loaded.

    A densekit training checkpoint records its class count and names; they override the config's, so
    ``load_model("efficientdet_d0", "run/checkpoints/last.pth")`` builds the run's head with its class names.
    ``overrides`` (nested dicts, as :func:`densekit.create_model`) apply to a model given by name.
    """
    if isinstance(model, (str, os.PathLike)) and is_artifact(model):  # Predictor("lite0.xml")
        if weights is not None:
            raise ValueError(f"{model} is an exported artifact, it holds its weights: drop weights={weights}")
        return load_artifact_model(model)
    if isinstance(model, nn.Module):
        if getattr(model, "config", None) is None:
            raise ValueError("Predictor needs a densekit model (built by densekit.create_model / build_model)")
        if weights is not None:
            found = read_model_weights(weights, prefer_ema=prefer_ema)
            load_state_dict_any(model, found.state_dict, found.source)
        return model
    # A checkpoint (a densekit run knows its classes), or an exported artifact (runs in its own runtime).
    spec = model_spec(model, weights, prefer_ema=prefer_ema, **overrides)
    if weights is None:
        log.warning("no weights given: %s predicts with freshly initialised weights", spec.config.name)
    return spec.build()


class Predictor:
    """Runs a model on images and returns one :class:`~densekit.deploy.predictions.Prediction` each, in
    original-image pixels (:class:`~densekit.deploy.predictions.Detections` or
    :class:`~densekit.deploy.predictions.SegmentationMap`).

    Args:
        model: A ``conf/model`` name (``"efficientdet_d0"``), a model config (e.g. Hydra's ``cfg.model``), a
            densekit model (put in eval mode on ``device``; with ``optimize`` a rewritten copy runs), or an exported
            artifact (``"lite0.xml"``, see :mod:`densekit.deploy.formats`), which carries its config and weights.
        weights: A checkpoint for ``weights=`` (densekit, efficientdet-pytorch or torchvision layout); the class
            count and names a densekit training run recorded are used. ``None`` keeps the model's weights. An
            exported artifact of the named model works too: it then runs in its runtime (OpenVINO, onnxruntime,
            TensorRT) with this class's pre- and post-processing.
        device: Where the model runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        score_threshold: Detection: keep boxes scoring at least this.
        image_size: Model input: detection an int (default: the model's ``image_size``); segmentation ``[H, W]``
            (default: each image at full resolution, as the evaluation). An artifact's default is its input size.
        optimize: Fold BatchNorm and use channels_last (:func:`densekit.optimize_for_inference`); same outputs to
            float rounding, less time.
        compile: Also ``torch.compile`` (one compile per input shape: worth it for many same-size images).
        batch_size: Images per forward pass.
        prefer_ema: Use a training checkpoint's EMA weights when it has them.
        backend: ``"torch"`` runs PyTorch weights in PyTorch. A format name (``"openvino"``, ``"onnx"``) converts
            them once, at construction, and runs them in that runtime with the same pre- and post-processing
            (:func:`densekit.deploy.formats.convert_model`; a few seconds, then OpenVINO's CPU kernels: see
            docs/deployment.md). An exported artifact always runs in its own runtime.
        tta: Detection: test-time augmentation, ``True`` for a flipped pass beside the plain one, or a
            :class:`~densekit.inference.tta.TTASettings` (scales, flip, merge).
        slicing: Detection: sliced inference of large images, a tile size ``[H, W]`` in original pixels (overlap 0.2,
            plus a full-image pass) or a :class:`~densekit.inference.slicing.SliceSettings`.
        **overrides: Model config overrides for a model given by name, e.g. ``num_classes=3``.
    """

    def __init__(
        self,
        model: str | Any,
        weights: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        score_threshold: float = 0.3,
        image_size: int | Sequence[int] | None = None,
        optimize: bool = True,
        compile: bool = False,
        batch_size: int = 1,
        prefer_ema: bool = True,
        backend: str = "torch",
        tta: bool | TTASettings = False,
        slicing: Sequence[int] | SliceSettings | None = None,
        **overrides: Any,
    ) -> None:
        from ..tasks import task_of_model  # late: the tasks import the evaluation loops, Predictor's users may not

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        net = load_model(model, weights, prefer_ema, **overrides).eval().to(self.device)
        self.config = net.config
        self.task = task_of_model(net.config)
        self.class_names = class_names_of(net.config)
        if backend != "torch" and artifact_of(net) is None:
            net = self._convert(net, backend, image_size, batch_size)
        artifact = artifact_of(net)
        if artifact is not None and image_size is None:  # an artifact's input size is fixed: resize to it
            image_size = list(artifact.info.image_size)
        self.inference = self.task.inference(net.config, image_size, score_threshold)
        self.channels_last = optimize and artifact is None
        self.model = net
        if artifact is not None:  # an artifact is already optimised by its runtime
            if compile:
                raise ValueError("compile=True is for PyTorch weights; an exported artifact runs in its own runtime")
        elif optimize or compile:  # a rewritten copy; the original is dropped
            self.model = optimize_for_inference(net, fold_bn=optimize, channels_last=optimize, compile=compile)
        self.batch_size = batch_size
        self._wrap_for_tta_and_slicing(tta, slicing, score_threshold)

    def _wrap_for_tta_and_slicing(self, tta: bool | TTASettings, slicing: Sequence[int] | SliceSettings | None,
                                  score_threshold: float) -> None:
        """Wrap ``self.model`` for test-time augmentation / sliced inference (densekit.inference); slicing also
        makes preprocessing keep each image's own size, since it tiles the full-resolution image itself."""
        self.tta = TTASettings() if tta is True else (tta or None)
        if slicing is not None and not isinstance(slicing, SliceSettings):
            slicing = SliceSettings(size=tile_size(slicing), batch_size=self.batch_size)
        self.slicing = slicing
        check_applicable(self.task.name, self.model, self.tta, self.slicing, "predict")
        if self.tta is None and self.slicing is None:
            return
        input_side = self.inference.transform.image_size
        self.model = wrap_detector(self.model, self.tta, self.slicing, input_side, score_threshold)
        if self.slicing is not None:
            self.inference = DetectionInference(keep_original_size, self.class_names, score_threshold)

    def _convert(self, net: nn.Module, backend: str, image_size: Any, batch_size: int) -> nn.Module:
        """``net`` converted to ``backend`` at the input size this predictor feeds it."""
        if image_size is None and self.task.name == "segmentation":
            raise ValueError(f"backend={backend!r} runs a fixed input size: pass image_size=[H, W] (segmentation "
                             "predicts at each image's full resolution by default, which only backend='torch' can)")
        size = image_size_arg(image_size, net.config.image_size)
        return convert_model(net, backend, size, batch_size).to(self.device)

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """One image -> its prediction; a list (or a ``[B, 3, H, W]`` / ``[B, H, W, 3]`` batch) -> a list."""
        batched = isinstance(images, (list, tuple)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)
        results = self.predict(list(images) if batched else [images])
        return results if batched else results[0]

    @torch.inference_mode()
    def predict(self, images: Sequence[ImageInput], names: Sequence[str] | None = None) -> list[Prediction]:
        """Predictions for ``images``, in order; ``names`` (e.g. file names) are quoted in errors.

        Consecutive images whose model inputs have the same shape share a forward pass (up to ``batch_size``).
        """
        if names is not None and len(names) != len(images):
            raise ValueError(f"{len(names)} names for {len(images)} images")
        results: list[Prediction] = []
        for tensors, metas in self._batches(images, names):
            batch = torch.stack(tensors).to(self.device)
            if self.channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            results += self.inference.predict(self.model, batch, metas)
        return results

    def _batches(self, images: Sequence[ImageInput], names: Sequence[str] | None) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
        """Preprocessed images grouped into same-shape batches, preprocessing each batch only when it is needed."""
        tensors: list[torch.Tensor] = []
        metas: list[dict] = []
        for index, image in enumerate(images):
            if names is not None:
                name = names[index]
            else:
                name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"image {index}"
            tensor, meta = self.inference.preprocess(to_rgb_uint8(image, name))
            if tensors and (len(tensors) == self.batch_size or tensor.shape != tensors[0].shape):
                yield tensors, metas
                tensors, metas = [], []
            tensors.append(tensor)
            metas.append(meta)
        if tensors:
            yield tensors, metas

    def __repr__(self) -> str:
        wrapped = describe(self.tta, self.slicing)
        return (f"{type(self).__name__}({self.config.name}, task={self.task.name}, device={self.device}, "
                f"{len(self.class_names)} classes{'; ' + wrapped if wrapped else ''})")

    def track(self, frames: Iterable[ImageInput], tracker: str = "bytetrack", fps: float = 30.0,
              **settings: Any) -> Iterator[Detections]:
        """The detections of consecutive video ``frames`` with ``track_ids`` (:mod:`densekit.inference.tracking`),
        one frame at a time, ``batch_size`` frames per forward pass::

            video = densekit.data.media.VideoFrames("street.mp4")
            for det in predictor.track(video, fps=video.fps, buffer_s=2.0):
                print(det.track_ids, det.names)   # -1: no confirmed track (yet)

        Args:
            frames: The frames in order, each as :meth:`predict` takes images; read at most one batch ahead.
            tracker: ``"bytetrack"`` or ``"sort"`` (the ``trackers`` package: ``pip install "densekit[track]"``).
            fps: The video's frame rate, which turns the settings in seconds into frames.
            **settings: :class:`~densekit.inference.tracking.TrackSettings` fields: ``buffer_s``, ``activation``,
                ``high_score``, ``iou``, ``min_frames``.

        Raises:
            TrackingError: a segmentation model, a bad setting, or the trackers package missing (at the call).
        """
        from ..inference.tracking import TrackSettings, track_frames  # late: tracking imports this package

        return track_frames(self, frames, TrackSettings(name=tracker, **settings), fps)
