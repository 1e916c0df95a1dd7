"""The routing explorer for the published book: routing by agreement runs in the reader's browser.

:func:`routing_explorer_html` writes one self-contained block of HTML for a handful of digits:
a digit chooser, an iteration stepper (previous, next and a range for T = 1..5), and, recomputed
in the browser for the chosen digit and T by ``capsutil/assets/core.js``, (a) the coupling
coefficients c_ij to the predicted class as a heatmap over the 6 x 6 positions (the mean of the
32 capsule maps at each position) and the mean coupling to each class as bars, (b) the ten
capsule lengths as bars and (c) the reconstruction from the predicted capsule beside the input.
Nothing is fetched: the weights and the digits travel in the block.

What the page carries (:class:`RoutingPayload`), and how precisely:

- u: the primary capsules of each digit, (N, 1152, 8) float32, computed here by PyTorch;
- W of DigitCaps, (1152, 10, 16, 8), as int8 codes with one float32 scale per (i, j) pair;
- the decoder: the first layer's 16 columns of each class the page can decode (the classes
  predicted for some digit at some T) in float16, the later layers as int8 codes with one
  float32 scale per row, every bias in float32.

Rounding each weight to its nearest int8 code misses the book's targets on the shown digits
(on six test digits: couplings 1.1e-3 and lengths 3.4e-3 from PyTorch's at T = 5, and 8 of
255 grey levels in the reconstruction), and the float16 decoder alone would take 3.8 MB of
base64. The codes are therefore rounded with greedy path-following quantisation (GPFQ; Lybrand
& Saab 2021, :func:`greedy_quantize`): weight by weight, each rounding takes into account the
error of the weights already rounded, on the inputs the page will feed them (the couplings
times u of the shown digits for W, the decoder's activations for the decoder), so that the
errors cancel in the sums instead of adding up. The codes suit the shown digits, the only
inputs the page has. The bytes are then deflate-compressed (the browser reads them with
``DecompressionStream``) and base64-encoded. ``tests/test_routing_explorer.py`` measures the
errors reached.

:func:`routing_in_payload` is the Python reference of the page: the same computation as
``core.js`` (float64 routing, float32 decoder activations) on the dequantised payload, to
check the page against it and against the float32 model.

Index letters as in :mod:`capsutil.routing`: ``b`` digit, ``i`` child (primary) capsule, ``j``
parent (digit) capsule, ``d`` child pose component, ``e`` parent pose component.
"""
from __future__ import annotations

import html as html_lib
import json
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from capsutil.classifier import check_images, check_pixels, eval_mode
from capsutil.explorer import (MAX_PAGE_BYTES, as_uint8_images, asset_scripts, asset_text,
                               check_element_id, decoder_layers, find_payload, pack_arrays,
                               payload_script, unpack_arrays)
from capsutil.layers import LENGTH_EPS
from capsutil.models import CapsNet
from capsutil.routing import SQUASH_EPS

PAYLOAD_FORMAT = "capsutil-routing-explorer/1"
MAX_ITERATIONS = 5                # the stepper runs over T = 1, ..., MAX_ITERATIONS
LEVELS = 127                      # int8 codes in [-127, 127]
# How much greedy quantisation of W weighs each child's own votes W_ij u_i against the sums
# s_j over all children (chosen on the measured errors; both are kept close).
VOTE_WEIGHT = 0.3


# ----------------------------------------------------------------------------------------------
# Routing by agreement and the decoder in NumPy, as the page computes them
# ----------------------------------------------------------------------------------------------

def route(u_hat: np.ndarray, iterations: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Routing by agreement (:func:`capsutil.routing.dynamic_routing`) in float64.

    u_hat: (..., I, J, E) votes. Returns the couplings (..., I, J) and the parent capsules
    v (..., J, E) of every iteration t = 0, ..., iterations - 1 (those of the last are the
    result of routing with T = iterations; the earlier ones are the results for smaller T).
    """
    logits = np.zeros(u_hat.shape[:-1])                                    # (..., I, J)
    couplings, poses = [], []
    for t in range(iterations):
        c = np.exp(logits - logits.max(-1, keepdims=True))
        c /= c.sum(-1, keepdims=True)                                      # softmax over j
        s = np.einsum("...ij,...ije->...je", c, u_hat)                     # (..., J, E)
        square = (s * s).sum(-1, keepdims=True)
        v = s * square / ((1 + square) * np.sqrt(square + SQUASH_EPS))     # squash
        couplings.append(c)
        poses.append(v)
        if t < iterations - 1:
            logits = logits + np.einsum("...ije,...je->...ij", u_hat, v)
    return couplings, poses


def lengths(v: np.ndarray) -> np.ndarray:
    """Capsule lengths sqrt(|v|^2 + eps): (..., J, E) -> (..., J)."""
    return np.sqrt((v * v).sum(-1) + LENGTH_EPS)


def first_layer(columns: np.ndarray, bias: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """The decoder's first layer on capsules masked to their class: poses (M, E) times the
    first layer's columns of each one's class, columns (M, H1, E), plus bias -> (M, H1)."""
    return np.einsum("mhe,me->mh", columns.astype(np.float64), poses) + bias


def relu32(x: np.ndarray) -> np.ndarray:
    """ReLU of activations stored as float32, as the page stores them, back in float64."""
    return np.maximum(x.astype(np.float32), 0).astype(np.float64)


def run_decoder(columns: np.ndarray, biases: list[np.ndarray], weights: list[np.ndarray],
                poses: np.ndarray) -> np.ndarray:
    """The decoder (Linear, (ReLU, Linear)*, Sigmoid) on poses (M, E) masked to their class:
    :func:`first_layer` with columns (M, H1, E) and biases[0], then the later layers
    weights[l] (out, in) with biases[l + 1]. Returns the pixels (M, P)."""
    x = first_layer(columns, biases[0], poses)
    for weight, bias in zip(weights, biases[1:]):
        x = relu32(x) @ weight.T + bias
    return 1 / (1 + np.exp(-x.astype(np.float32).astype(np.float64)))


# ----------------------------------------------------------------------------------------------
# Quantisation: int8 codes, rounded greedily on the inputs they will see
# ----------------------------------------------------------------------------------------------

def _scales(weight: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """One scale per group (the axes not in ``axes`` index the groups): its largest |w| / 127."""
    largest = np.abs(weight).max(axis=axes, keepdims=True)
    return np.where(largest > 0, largest / LEVELS, 1.0).astype(np.float32).astype(np.float64)


def _round(target: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.round(target / scale), -LEVELS, LEVELS)


def greedy_quantize(weight: np.ndarray, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes (out, in) and one scale per row (out,) for a linear layer's weight (out, in),
    rounded column by column so that the layer's outputs on ``inputs`` (M, in) stay close.

    GPFQ (Lybrand & Saab 2021): with r the error so far on the M inputs, column k's weights are
    rounded from w_k + <r, x_k> / |x_k|^2, the value that best cancels r, and r += (w_k - q_k) x_k.
    """
    scale = _scales(weight, (1,))                                          # (out, 1)
    residual = np.zeros((len(weight), len(inputs)))                        # (out, M)
    norms = (inputs * inputs).sum(0)                                       # (in,)
    codes = np.empty(weight.shape, np.int8)
    for k in range(weight.shape[1]):
        x = inputs[:, k]                                                   # (M,)
        target = weight[:, k] + (residual @ x / norms[k] if norms[k] > 0 else 0)
        codes[:, k] = _round(target, scale[:, 0])
        residual += np.outer(weight[:, k] - codes[:, k] * scale[:, 0], x)
    return codes, scale[:, 0].astype(np.float32)


def quantize_votes(weight: np.ndarray, u: np.ndarray,
                   couplings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes (I, J, E, D) and scales (I, J) for DigitCaps' W, rounded greedily (GPFQ).

    weight: (I, J, E, D); u: (N, I, D) the shown digits' primary capsules; couplings
    (N, T, I, J) those of each iteration of the float model. Row (j, e) of the big linear map
    s_je = sum_id c_ij W_ijed u_id is rounded child by child on the inputs c_ij u_id, so that
    the sums s_j stay close; each child's own votes W_ij u_i on the N digits (weighed by
    :data:`VOTE_WEIGHT`) too, since they set its agreement with the parents.
    """
    I, J, E, D = weight.shape
    scale = _scales(weight, (2, 3))[:, :, 0, 0]                            # (I, J)
    x = couplings[..., None] * u[:, None, :, None, :]                      # (N, T, I, J, D)
    x = x.transpose(3, 2, 4, 0, 1).reshape(J, I, D, -1)                    # (J, I, D, N*T)
    residual = np.zeros((J, E, x.shape[-1]))                               # the sums s_je
    codes = np.empty(weight.shape, np.int8)
    for i in range(I):
        own = np.zeros((J, E, len(u)))                                     # child i's votes
        for d in range(D):
            z = VOTE_WEIGHT * u[:, i, d]                                   # (N,)
            norm = (x[:, i, d] ** 2).sum(-1)[:, None] + (z * z).sum()      # (J, 1)
            w = weight[i, :, :, d]                                         # (J, E)
            pull = np.einsum("jem,jm->je", residual, x[:, i, d]) + own @ z
            codes[i, :, :, d] = _round(w + pull / np.maximum(norm, 1e-30), scale[i][:, None])
            error = w - codes[i, :, :, d] * scale[i][:, None]              # (J, E)
            residual += error[:, :, None] * x[:, i, d][:, None, :]
            own += error[:, :, None] * z
    return codes, scale.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# What the page carries
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoutingPayload:
    """Everything a routing explorer page carries, as NumPy arrays.

    u: float32 (N, I, D) each digit's primary capsules; weight_codes: int8 (I, J, E, D) and
    weight_scales: float32 (I, J), W = codes * scale; classes: int64 (C,) the classes the page
    can decode, columns: float16 (C, H1, E) their first-layer columns; layer_codes: int8
    (out, in) and layer_scales: float32 (out,) of each later decoder layer; biases: float32
    (out,) of every decoder layer; images: uint8 (N, side, side); names: N captions; maps: the
    number of primary capsule maps (I = maps * grid * grid); start: the T the page opens at.
    """

    u: np.ndarray
    weight_codes: np.ndarray
    weight_scales: np.ndarray
    classes: np.ndarray
    columns: np.ndarray
    layer_codes: tuple[np.ndarray, ...]
    layer_scales: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    images: np.ndarray
    names: tuple[str, ...]
    maps: int
    start: int

    @property
    def side(self) -> int:
        """Image side in pixels (28 for MNIST)."""
        return self.images.shape[1]

    def weight(self) -> np.ndarray:
        """W dequantised, float64 (I, J, E, D)."""
        return self.weight_codes * self.weight_scales.astype(np.float64)[:, :, None, None]

    def layers(self) -> list[np.ndarray]:
        """The later decoder layers dequantised, float64 (out, in) each."""
        return [codes * scales.astype(np.float64)[:, None]
                for codes, scales in zip(self.layer_codes, self.layer_scales)]


@dataclass(frozen=True)
class RoutingResult:
    """What the page shows for one digit and T: couplings (I, J) of the last iteration, lengths
    (J,), the predicted class (the longest capsule), its pose (E,) and the reconstruction (P,)."""

    couplings: np.ndarray
    lengths: np.ndarray
    predicted: int
    pose: np.ndarray
    reconstruction: np.ndarray


def _check_model(model: nn.Module) -> CapsNet:
    if not isinstance(model, CapsNet):
        raise ValueError(f"expected a capsutil.models.CapsNet, got {type(model).__name__}")
    decoder_layers(model.decoder)
    return model


@torch.no_grad()
def primary_capsules(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The primary capsules u (N, I, D), float32 on the CPU, of float images (N, 1, 28, 28) in
    [0, 1] (any size the CapsNet takes), computed in eval mode (the mode is restored)."""
    model = _check_model(model)
    check_images(images, model.in_channels, model.image_size)
    check_pixels(images)
    if len(images) == 0:
        raise ValueError("expected at least one image, got 0")
    with eval_mode(model):
        x = model.model_input(images.to(next(model.parameters()).device))
        return model.primary(torch.relu(model.conv1(x))).float().cpu()      # (N, I, D)


def _half_columns(first: torch.Tensor, classes: np.ndarray, caps: int) -> np.ndarray:
    """The first layer's columns of ``classes``: (H1, J*E) -> float16 (C, H1, E)."""
    first = first.detach().cpu().reshape(len(first), caps, -1)             # (H1, J, E)
    return first[:, torch.from_numpy(classes)].permute(1, 0, 2).half().numpy()


def _quantize_w(weight: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, ...]:
    """W (I, J, E, D) quantised on the digits' u (N, I, D) (:func:`quantize_votes`), and what
    the page then computes at T = 1..5: the predicted class (N*T,) and its capsule (N*T, E)."""
    couplings, _ = route(np.einsum("ijed,bid->bije", weight, u), MAX_ITERATIONS)
    codes, scales = quantize_votes(weight, u, np.stack(couplings, 1))
    quantized = codes * scales.astype(np.float64)[:, :, None, None]
    _, poses = route(np.einsum("ijed,bid->bije", quantized, u), MAX_ITERATIONS)
    poses = np.stack(poses, 1).reshape(-1, *poses[0].shape[1:])            # (N*T, J, E)
    predicted = lengths(poses).argmax(-1)                                  # (N*T,)
    return codes, scales, predicted, poses[np.arange(len(poses)), predicted]


def _quantize_decoder(linears: list[nn.Linear], columns: np.ndarray, biases: list[np.ndarray],
                      poses: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """int8 codes and row scales of the decoder's later layers, each quantised greedily on the
    activations the page feeds it: those of the capsules poses (M, E) through the first
    layer's columns of their class, columns (M, H1, E), and the layers already quantised."""
    x = first_layer(columns, biases[0], poses.astype(np.float32))
    codes, scales = [], []
    for linear, bias in zip(linears[1:], biases[1:]):
        x = relu32(x)                                                      # (M, n_in)
        layer, scale = greedy_quantize(linear.weight.detach().cpu().double().numpy(), x)
        codes.append(layer)
        scales.append(scale)
        x = x @ (layer * scale.astype(np.float64)[:, None]).T + bias
    return codes, scales


def build_routing_payload(model: nn.Module, images: torch.Tensor,
                          names: list[str] | None = None) -> RoutingPayload:
    """Gather what the page needs for ``images`` (N, 1, 28, 28) float in [0, 1]: their primary
    capsules, W and the decoder quantised on them (see the module's docstring), and captions."""
    u = primary_capsules(model, images).numpy()                            # (N, I, D)
    names = [f"example {k}" for k in range(len(u))] if names is None else list(names)
    if len(names) != len(u) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"expected {len(u)} captions (strings), got {len(names)}")
    weight = model.digits.weight.detach().cpu().double().numpy()          # (I, J, E, D)
    codes, scales, predicted, poses = _quantize_w(weight, u.astype(np.float64))
    classes = np.unique(predicted)                                         # (C,)
    linears = decoder_layers(model.decoder)
    columns = _half_columns(linears[0].weight, classes, weight.shape[1])   # (C, H1, E)
    biases = [linear.bias.detach().cpu().float().numpy() for linear in linears]
    layer_codes, layer_scales = _quantize_decoder(
        linears, columns[np.searchsorted(classes, predicted)], biases, poses)
    return RoutingPayload(
        u=u, weight_codes=codes, weight_scales=scales, classes=classes.astype(np.int64),
        columns=columns, layer_codes=tuple(layer_codes), layer_scales=tuple(layer_scales),
        biases=tuple(biases), images=as_uint8_images(images, len(u), model.image_size),
        names=tuple(names), maps=model.primary.maps,
        start=min(max(model.digits.iterations, 1), MAX_ITERATIONS))


def routing_in_payload(payload: RoutingPayload, digit: int, iterations: int) -> RoutingResult:
    """What the page computes for digit ``digit`` of the payload and T = ``iterations``, from
    the dequantised payload: the Python twin of ``core.js`` (``votes``, ``route``, ``lengths``,
    ``decoder``)."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) \
            or not 1 <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"expected iterations between 1 and {MAX_ITERATIONS}, "
                         f"got {iterations!r}")
    if isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit < len(payload.u):
        raise ValueError(f"expected a digit between 0 and {len(payload.u) - 1}, got {digit!r}")
    u_hat = np.einsum("ijed,id->ije", payload.weight(), payload.u[digit].astype(np.float64))
    couplings, poses = route(u_hat, iterations)
    capsule_lengths = lengths(poses[-1])                                   # (J,)
    predicted = int(capsule_lengths.argmax())
    slot = np.flatnonzero(payload.classes == predicted)
    if not len(slot):
        raise ValueError(f"the payload carries no decoder columns for class {predicted}")
    pose = poses[-1][predicted].astype(np.float32)                         # as the page stores it
    pixels = run_decoder(payload.columns[slot], list(payload.biases), payload.layers(),
                         pose[None])[0]
    return RoutingResult(couplings[-1], capsule_lengths, predicted, pose, pixels)


# ----------------------------------------------------------------------------------------------
# Into HTML and back
# ----------------------------------------------------------------------------------------------

def _pack(payload: RoutingPayload) -> dict:
    arrays = {"u": payload.u, "weight_codes": payload.weight_codes,
              "weight_scales": payload.weight_scales, "columns": payload.columns,
              "images": payload.images}
    arrays |= {f"codes{k + 1}": c for k, c in enumerate(payload.layer_codes)}
    arrays |= {f"scales{k + 1}": s for k, s in enumerate(payload.layer_scales)}
    arrays |= {f"bias{k}": b for k, b in enumerate(payload.biases)}
    return {"format": PAYLOAD_FORMAT, "layers": len(payload.biases), "maps": payload.maps,
            "side": payload.side, "classes": payload.classes.tolist(),
            "names": list(payload.names), "start": payload.start,
            "max_iterations": MAX_ITERATIONS, "squash_eps": SQUASH_EPS,
            "length_eps": LENGTH_EPS, **pack_arrays(arrays, compress=True)}


def _unpack(spec: dict) -> RoutingPayload:
    array = unpack_arrays(spec)
    layers = spec["layers"]
    return RoutingPayload(
        u=array["u"], weight_codes=array["weight_codes"], weight_scales=array["weight_scales"],
        classes=np.array(spec["classes"], np.int64), columns=array["columns"],
        layer_codes=tuple(array[f"codes{k}"] for k in range(1, layers)),
        layer_scales=tuple(array[f"scales{k}"] for k in range(1, layers)),
        biases=tuple(array[f"bias{k}"] for k in range(layers)), images=array["images"],
        names=tuple(spec["names"]), maps=spec["maps"], start=spec["start"])


def routing_payload_html(payload: RoutingPayload, element_id: str = "routing-explorer",
                         max_bytes: int = MAX_PAGE_BYTES) -> str:
    """The explorer of ``payload`` as one HTML block (display it with ``IPython.display.HTML``).

    Every id in the block starts with ``element_id`` (``<id>-digit``, ``<id>-iterations``,
    ``<id>-previous``, ``<id>-next``, ``<id>-reconstruction``, ...), so several explorers can
    share a page. Raises ``ValueError`` if the block exceeds ``max_bytes``.
    """
    check_element_id(element_id)
    options = "\n".join(f'<option value="{k}">{html_lib.escape(name)}</option>'
                        for k, name in enumerate(payload.names))
    block = _PAGE.format(id=element_id, options=options, side=payload.side, start=payload.start,
                         last=MAX_ITERATIONS, css=asset_text("routing-explorer.css"),
                         payload=payload_script(_pack(payload), element_id),
                         assets=asset_scripts("routing-explorer.js"),
                         root=json.dumps(element_id))
    n_bytes = len(block.encode("utf-8"))
    if n_bytes > max_bytes:
        raise ValueError(f"the routing explorer takes {n_bytes:,} bytes, over the budget of "
                         f"{max_bytes:,}; show fewer digits")
    return block


def routing_explorer_html(model: nn.Module, images: torch.Tensor, names: list[str] | None = None,
                          element_id: str = "routing-explorer") -> str:
    """The browser's routing explorer for ``images`` (N, 1, 28, 28) float in [0, 1] and the
    trained CapsNet ``model``: :func:`routing_payload_html` of :func:`build_routing_payload`."""
    check_element_id(element_id)
    return routing_payload_html(build_routing_payload(model, images, names), element_id)


def read_routing_payload(page: str, element_id: str | None = None) -> RoutingPayload:
    """The payload of the routing explorer ``element_id`` (the first one when None) in a page."""
    return _unpack(find_payload(page, PAYLOAD_FORMAT, element_id, "routing explorer"))


_PAGE = """<div id="{id}" class="routing-explorer" data-routing-explorer="{id}">
<style>{css}</style>
<div class="rex-controls">
<label for="{id}-digit">digit</label>
<select id="{id}-digit" data-role="digit">
{options}
</select>
<label for="{id}-iterations">routing iterations</label>
<output id="{id}-iterations-value" for="{id}-iterations" data-role="value">T = {start}</output>
<span class="rex-stepper" role="group" aria-label="routing iterations">
<button type="button" id="{id}-previous" data-role="previous">previous</button>
<input type="range" id="{id}-iterations" data-role="iterations" min="1" max="{last}" step="1"
 value="{start}">
<button type="button" id="{id}-next" data-role="next">next</button>
</span>
</div>
<div class="rex-panels">
<figure><canvas id="{id}-input" data-role="input" width="{side}" height="{side}"></canvas>
<figcaption>input</figcaption></figure>
<figure><canvas id="{id}-reconstruction" data-role="reconstruction" width="{side}"
 height="{side}"></canvas>
<figcaption data-role="reconstruction-caption">reconstruction</figcaption></figure>
<figure><canvas id="{id}-heatmap" data-role="heatmap" data-width="204" data-height="204">
</canvas>
<figcaption data-role="heatmap-caption">coupling to the predicted class</figcaption></figure>
</div>
<div class="rex-panels">
<figure><canvas id="{id}-couplings" data-role="couplings" data-width="300" data-height="130">
</canvas>
<figcaption>mean coupling c<sub>ij</sub> of the children to each class j (dashed: uniform)
</figcaption></figure>
<figure><canvas id="{id}-lengths" data-role="lengths" data-width="300" data-height="130">
</canvas>
<figcaption>capsule lengths |v<sub>j</sub>|</figcaption></figure>
</div>
<p id="{id}-status" data-role="status">The explorer starts when the page's script runs.</p>
{payload}
{assets}
<script>capsutil.routingExplorer.start(document.getElementById({root}));</script>
</div>"""
