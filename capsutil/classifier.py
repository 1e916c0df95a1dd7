"""What every image classifier of the book shares: checked inputs and batched prediction.

A model here takes float images (B, C, H, W) in [0, 1] and returns an output object with
``predictions`` (B,): CapsNet, the matrix capsule network and the CNN baselines alike.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable

import torch
from torch import nn


def check_images(images: torch.Tensor, channels: int, size: int) -> None:
    """Raise ``ValueError`` unless ``images`` is a float tensor of shape (N, channels, size, size)."""
    expected = f"(N, {channels}, {size}, {size})"
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"expected images as a tensor of shape {expected}, got {type(images).__name__}")
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, size, size):
        got = "(" + ", ".join(["N", *map(str, images.shape[1:])][:images.dim()]) + ")"
        raise ValueError(f"expected images of shape {expected}, got {got}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got {images.dtype}; "
                         f"convert with capsutil.data.to_float")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the ``with`` block; its training/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def check_batch_size(batch_size: int) -> int:
    """Raise ``ValueError`` unless ``batch_size`` is a positive integer; return it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"expected a positive integer batch_size, got {batch_size!r}")
    return batch_size


@torch.no_grad()
def predict_in_batches(model: nn.Module, images: torch.Tensor, batch_size: int = 500,
                       prepare: Callable[[torch.Tensor], torch.Tensor] = lambda x: x) -> torch.Tensor:
    """Predicted classes, int64 (N,) on the CPU, of ``model`` in eval mode for ``images`` (N, ...).

    Each chunk of ``batch_size`` images goes through ``prepare`` (e.g. uint8 -> float) and onto
    the model's device; the model's training/eval mode is restored afterwards. No images give
    an empty result.
    """
    check_batch_size(batch_size)
    if len(images) == 0:
        return torch.empty(0, dtype=torch.int64)
    device = next(model.parameters()).device
    with eval_mode(model):
        return torch.cat([model(prepare(chunk).to(device)).predictions.cpu()
                          for chunk in images.split(batch_size)])                 # (N,)


def check_pixels(images: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every pixel of the float ``images`` is finite and in [0, 1]."""
    if not images.numel():
        return
    bad = int((~torch.isfinite(images)).sum())
    if bad:
        raise ValueError(f"expected finite pixel values in [0, 1], got {bad} NaN or infinite "
                         f"values")
    if float(images.min()) < 0 or float(images.max()) > 1:
        raise ValueError(f"expected pixel values in [0, 1], got values from "
                         f"{float(images.min()):g} to {float(images.max()):g}")


class ImageClassifier(nn.Module):
    """A model of images (B, ``in_channels``, ``image_size``, ``image_size``) whose output has
    ``predictions`` (B,); it gains :meth:`predict`."""

    in_channels: int
    image_size: int

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` checked (:func:`check_images`) and in the dtype of the model's weights, so
        float64, float16 or bfloat16 images work with a float32 model (a no-op when they match)."""
        check_images(images, self.in_channels, self.image_size)
        return images.to(next(self.parameters()).dtype)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Class indices, int64 (N,), for float images (N, C, H, W) in [0, 1] of any float dtype;
        in eval mode. No images give an empty result; NaN or infinite pixels raise."""
        check_images(images, self.in_channels, self.image_size)
        check_pixels(images)
        return predict_in_batches(self, images, batch_size).to(images.device)
