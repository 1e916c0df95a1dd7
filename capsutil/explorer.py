"""The pose explorer of chapter 06 for the published book: the decoder runs in the reader's browser.

A digit capsule is a pose vector of E = 16 numbers, and the decoder turns the capsule of one
class into an image (chapter 05). :func:`pose_explorer_html` writes one self-contained block of
HTML: a digit chooser, one slider per pose dimension that adds an offset to it, a reset button,
and a canvas that a short script redraws by running the decoder in the browser on every move.
The trained decoder's weights (float16) and the chosen digits' capsules (float32) travel inside
the block, base64-encoded (over :data:`BLOB_ALPHABET`); nothing is fetched, so it works in the
static book with no kernel.

Only part of the first layer is needed. The decoder's input is the J*E vector of all capsules
with every capsule but class c's set to zero (:meth:`capsutil.layers.Decoder.mask`), so

    W1 mask(v, c) + b1 = W1[:, c*E:(c+1)*E] v + b1,

and the page carries the E columns of each class it shows (all 10 when every class is shown);
the later layers go whole. The script keeps weights, capsules and activations in float32
(``Float32Array``) like PyTorch; it sums each dot product in double precision and rounds the
result to float32 as it stores it. PyTorch sums in float32 in its own order, so the two agree to
float32 rounding error, far below one grey level. (Rounding every partial sum with
``Math.fround`` would mimic float32 sums more closely and costs about three times as long.)

Index letters as in :mod:`capsutil.layers`: ``j`` parent capsule (a class), ``e`` pose component.
"""
from __future__ import annotations

import base64
import html as html_lib
import json
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from capsutil.layers import Decoder

PAYLOAD_FORMAT = "capsutil-pose-explorer/1"
MAX_PAGE_BYTES = 4_000_000          # the budget: what one explorer may add to a page
ELEMENT_ID = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")
# Base64 with its own 64 symbols: no "/" and no "n" or "r" in either case, so that megabytes of
# encoded weights cannot spell a path or a word such as nan, inf, error or warning by chance.
BLOB_ALPHABET = "0123456789ABCDEFGHIJKLMOPQSTUVWXYZabcdefghijklmopqstuvwxyz-_.~!*"
_STANDARD = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_TO_BLOB = bytes.maketrans(_STANDARD, BLOB_ALPHABET.encode("ascii"))
_FROM_BLOB = bytes.maketrans(BLOB_ALPHABET.encode("ascii"), _STANDARD)


# ----------------------------------------------------------------------------------------------
# The model side: which capsule to decode, and decoding it alone
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def predicted_capsules(model: nn.Module, images: torch.Tensor,
                       batch_size: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """The capsule of the predicted class of each image, and that class.

    images: float (N, C, H, W) in [0, 1]. Returns poses (N, E) and classes int64 (N,), on the
    images' device. The model runs in eval mode (its mode is restored afterwards), so the
    predicted class is the longest capsule, the one the decoder reconstructs at test time.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected a non-empty batch of images (N, C, H, W), got {got}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        poses, classes = [], []
        for chunk in images.split(batch_size):
            output = model(chunk.to(device))
            index = output.predictions                                  # (B,)
            poses.append(output.poses[torch.arange(len(index), device=device), index])  # (B, E)
            classes.append(index)
    finally:
        model.train(was_training)
    return torch.cat(poses).to(images.device), torch.cat(classes).to(images.device)


def decoder_layers(decoder: nn.Module) -> list[nn.Linear]:
    """The linear layers of a :class:`capsutil.layers.Decoder`, checking it is
    Linear, (ReLU, Linear)*, Sigmoid, which is what the browser's script computes."""
    if not isinstance(decoder, Decoder):
        raise ValueError(f"expected a capsutil.layers.Decoder, got {type(decoder).__name__}")
    modules = list(decoder.net)
    linears = modules[0::2]
    between = modules[1:-1:2]
    if (len(modules) % 2 or not all(isinstance(m, nn.Linear) for m in linears)
            or not all(isinstance(m, nn.ReLU) for m in between)
            or not isinstance(modules[-1], nn.Sigmoid)):
        names = ", ".join(type(m).__name__ for m in modules)
        raise ValueError(f"expected the decoder's layers as Linear, (ReLU, Linear)*, Sigmoid; "
                         f"got {names}")
    return linears


def _check_capsules(poses: torch.Tensor, classes: torch.Tensor, n_caps: int, dims: int) -> None:
    if not isinstance(poses, torch.Tensor) or poses.dim() != 2 or poses.shape[1] != dims:
        got = tuple(poses.shape) if isinstance(poses, torch.Tensor) else type(poses).__name__
        raise ValueError(f"expected poses of shape (N, {dims}), got {got}")
    if not isinstance(classes, torch.Tensor) or classes.shape != (len(poses),):
        got = tuple(classes.shape) if isinstance(classes, torch.Tensor) else type(classes).__name__
        raise ValueError(f"expected classes of shape ({len(poses)},), got {got}")
    if classes.dtype != torch.int64:
        raise ValueError(f"expected int64 classes, got {classes.dtype}")
    if len(classes) and (int(classes.min()) < 0 or int(classes.max()) >= n_caps):
        raise ValueError(f"expected classes in [0, {n_caps}), got values from "
                         f"{int(classes.min())} to {int(classes.max())}")


def _pose_size(poses: torch.Tensor) -> int:
    if not isinstance(poses, torch.Tensor) or poses.dim() != 2:
        got = tuple(poses.shape) if isinstance(poses, torch.Tensor) else type(poses).__name__
        raise ValueError(f"expected poses of shape (N, E), got {got}")
    return poses.shape[1]


def n_capsules(decoder: nn.Module, dims: int) -> int:
    """The number of capsules J a decoder reads, given the pose size E: its input is J * E."""
    in_features = decoder_layers(decoder)[0].in_features
    if in_features % dims:
        raise ValueError(f"the decoder reads {in_features} numbers, not a multiple of "
                         f"{dims}-D capsules")
    return in_features // dims


@torch.no_grad()
def decode_capsules(decoder: nn.Module, poses: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Decode each pose as the capsule of its class, every other capsule zero.

    poses: (M, E); classes: int64 (M,). Returns (M, pixels) in [0, 1] on the decoder's device:
    its output for the masked input of :meth:`capsutil.layers.Decoder.mask`, as at test time in
    chapter 05.
    """
    dims = _pose_size(poses)
    n_caps = n_capsules(decoder, dims)
    _check_capsules(poses, classes, n_caps, dims)
    device = next(decoder.parameters()).device
    poses, classes = poses.to(device), classes.to(device)
    full = poses.new_zeros(len(poses), n_caps, poses.shape[1])          # (M, J, E)
    full[torch.arange(len(poses), device=device), classes] = poses
    return decoder(full, classes)                                       # (M, pixels)


# ----------------------------------------------------------------------------------------------
# What the page carries
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ExplorerPayload:
    """Everything a pose explorer page carries, as NumPy arrays.

    columns: float16 (C, H1, E), for each shown class ``classes[c]`` the E columns of the first
    layer's weight that its capsule multiplies; weights: float16 (out, in) of the later layers;
    biases: float16 (out,) of every layer; n_caps: J, the capsules the decoder reads; poses:
    float32 (N, E) the digits' capsules; labels: int64 (N,) the class each is decoded as;
    images: uint8 (N, side, side) the input digits; names: N captions for the chooser.
    """

    classes: np.ndarray
    columns: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    n_caps: int
    poses: np.ndarray
    labels: np.ndarray
    images: np.ndarray
    names: tuple[str, ...]

    @property
    def side(self) -> int:
        """Image side in pixels (28 for MNIST)."""
        return self.images.shape[1]

    def decoder(self) -> Decoder:
        """A float32 :class:`Decoder` holding these float16 weights exactly; the first-layer
        columns of classes the page does not show are zero (their capsules are always masked)."""
        dims = self.poses.shape[1]
        hidden = tuple(w.shape[1] for w in self.weights)
        pixels = self.weights[-1].shape[0] if self.weights else self.columns.shape[1]
        decoder = Decoder(self.n_caps, dims, hidden, pixels)
        first = np.zeros((self.columns.shape[1], self.n_caps, dims), np.float32)   # (H1, J, E)
        first[:, self.classes] = self.columns.transpose(1, 0, 2)
        matrices = [first.reshape(len(first), -1), *self.weights]      # (H1, J*E), (out, in)...
        with torch.no_grad():
            for linear, weight, bias in zip(decoder_layers(decoder), matrices, self.biases):
                linear.weight.copy_(torch.from_numpy(np.asarray(weight, np.float32)))
                linear.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
        return decoder.eval()


def _as_uint8_images(images: torch.Tensor, n: int, side: int) -> np.ndarray:
    expected = f"({n}, {side}, {side}), ({n}, 1, {side}, {side}) or ({n}, {side * side})"
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"expected images as a tensor of shape {expected}, "
                         f"got {type(images).__name__}")
    if images.numel() != n * side * side or images.shape[0] != n:
        raise ValueError(f"expected images of shape {expected}, got {tuple(images.shape)}")
    flat = images.detach().cpu().reshape(n, side, side)                 # (N, side, side)
    if flat.dtype == torch.uint8:
        return flat.numpy()
    if not flat.is_floating_point() or float(flat.min()) < 0 or float(flat.max()) > 1:
        raise ValueError("expected uint8 images or float images in [0, 1]")
    return torch.round(flat * 255).to(torch.uint8).numpy()


def _half(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().to(torch.float16).numpy()


def build_payload(decoder: nn.Module, poses: torch.Tensor, classes: torch.Tensor,
                  images: torch.Tensor, names: list[str] | None = None) -> ExplorerPayload:
    """Gather what the page needs: the decoder's weights in float16 (first layer: only the
    columns of the classes in ``classes``), and the N digits' poses (N, E), classes (N,),
    images (N, side, side) or (N, 1, side, side) or (N, side*side), and captions."""
    layers = decoder_layers(decoder)
    dims = _pose_size(poses)
    n_caps = n_capsules(decoder, dims)
    _check_capsules(poses, classes, n_caps, dims)
    if len(poses) == 0:
        raise ValueError("expected at least one digit, got 0")
    pixels = layers[-1].out_features
    side = math.isqrt(pixels)
    if side * side != pixels:
        raise ValueError(f"expected the decoder to output a square image, got {pixels} pixels")
    names = [f"example {k}" for k in range(len(poses))] if names is None else list(names)
    if len(names) != len(poses) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"expected {len(poses)} captions (strings), got {len(names)}")
    if not all(torch.isfinite(p).all() for p in decoder.parameters()):
        raise ValueError("expected finite decoder weights, found inf or nan")
    if not torch.isfinite(poses).all():
        raise ValueError("expected finite poses, found inf or nan")
    shown = np.unique(classes.cpu().numpy())                            # (C,)
    with torch.no_grad():
        first = layers[0].weight.detach().cpu().reshape(-1, n_caps, dims)   # (H1, J, E)
        columns = first[:, torch.from_numpy(shown)].permute(1, 0, 2)        # (C, H1, E)
        return ExplorerPayload(
            classes=shown.astype(np.int64), columns=_half(columns),
            weights=tuple(_half(layer.weight) for layer in layers[1:]),
            biases=tuple(_half(layer.bias) for layer in layers), n_caps=n_caps,
            poses=poses.detach().cpu().to(torch.float32).numpy(),
            labels=classes.cpu().numpy().astype(np.int64),
            images=_as_uint8_images(images, len(poses), side), names=tuple(names))


# ----------------------------------------------------------------------------------------------
# Into HTML and back
# ----------------------------------------------------------------------------------------------

def _pack(payload: ExplorerPayload) -> dict:
    """The JSON the page carries: a manifest of typed arrays inside one little-endian base64 blob."""
    arrays = {"columns": payload.columns, "poses": payload.poses, "images": payload.images}
    arrays |= {f"weight{k + 1}": w for k, w in enumerate(payload.weights)}
    arrays |= {f"bias{k}": b for k, b in enumerate(payload.biases)}
    dtypes = {np.dtype(np.float16): ("float16", "<f2"), np.dtype(np.float32): ("float32", "<f4"),
              np.dtype(np.uint8): ("uint8", "u1")}
    manifest, chunks, offset = {}, [], 0
    for name, array in arrays.items():
        label, layout = dtypes[array.dtype]
        raw = np.ascontiguousarray(array, dtype=layout).tobytes()
        manifest[name] = {"dtype": label, "shape": list(array.shape), "offset": offset}
        chunks.append(raw)
        offset += len(raw)
    return {"format": PAYLOAD_FORMAT, "caps": payload.n_caps, "dims": payload.poses.shape[1],
            "side": payload.side, "layers": len(payload.biases),
            "classes": payload.classes.tolist(), "labels": payload.labels.tolist(),
            "names": list(payload.names), "arrays": manifest, "alphabet": BLOB_ALPHABET,
            "blob": base64.b64encode(b"".join(chunks)).translate(_TO_BLOB).decode("ascii")}


def _unpack(spec: dict) -> ExplorerPayload:
    if spec.get("format") != PAYLOAD_FORMAT:
        raise ValueError(f"expected a {PAYLOAD_FORMAT} payload, got {spec.get('format')!r}")
    blob = base64.b64decode(spec["blob"].encode("ascii").translate(_FROM_BLOB))
    layouts = {"float16": "<f2", "float32": "<f4", "uint8": "u1"}

    def array(name: str) -> np.ndarray:
        entry = spec["arrays"][name]
        count = math.prod(entry["shape"])
        return np.frombuffer(blob, layouts[entry["dtype"]], count,
                             entry["offset"]).reshape(entry["shape"]).astype(entry["dtype"])

    layers = spec["layers"]
    return ExplorerPayload(
        classes=np.array(spec["classes"], np.int64), columns=array("columns"),
        weights=tuple(array(f"weight{k}") for k in range(1, layers)),
        biases=tuple(array(f"bias{k}") for k in range(layers)), n_caps=spec["caps"],
        poses=array("poses"), labels=np.array(spec["labels"], np.int64),
        images=array("images"), names=tuple(spec["names"]))


def explorer_html(payload: ExplorerPayload, element_id: str = "pose-explorer",
                  limit: float = 0.5, step: float = 0.01, scale: int = 8,
                  max_bytes: int = MAX_PAGE_BYTES) -> str:
    """The explorer as one HTML block (display it with ``IPython.display.HTML``).

    Sliders run from ``-limit`` to ``+limit`` in steps of ``step``; canvases are side x side
    pixels shown ``scale`` times larger. Every id in the block starts with ``element_id``
    (``<id>-dim-3``, ``<id>-digit``, ``<id>-reset``, ``<id>-reconstruction``), so several
    explorers can share a page. Raises ``ValueError`` if the block exceeds ``max_bytes``.
    """
    if not isinstance(element_id, str) or not ELEMENT_ID.match(element_id):
        raise ValueError(f"expected an HTML id of letters, digits, '-' and '_' starting with a "
                         f"letter, got {element_id!r}")
    if not (isinstance(limit, (int, float)) and isinstance(step, (int, float))
            and 0 < step <= limit and math.isfinite(limit)):
        raise ValueError(f"expected 0 < step <= limit, got step {step!r}, limit {limit!r}")
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"expected a positive integer scale, got {scale!r}")
    spec = json.dumps(_pack(payload), separators=(",", ":")).replace("<", "\\u003c")  # no </script>
    sliders = "\n".join(_SLIDER.format(id=element_id, e=e, limit=limit, step=step)
                        for e in range(payload.poses.shape[1]))
    options = "\n".join(f'<option value="{k}">{html_lib.escape(name)}</option>'
                        for k, name in enumerate(payload.names))
    size = payload.side * scale
    block = _PAGE.format(id=element_id, sliders=sliders, options=options, side=payload.side,
                         size=size, spec=spec,
                         script=_SCRIPT.replace("__ROOT_ID__", json.dumps(element_id)))
    n_bytes = len(block.encode("utf-8"))
    if n_bytes > max_bytes:
        raise ValueError(f"the explorer takes {n_bytes:,} bytes, over the budget of "
                         f"{max_bytes:,}; show fewer classes or a smaller decoder")
    return block


def read_payload(page: str, element_id: str | None = None) -> ExplorerPayload:
    """The payload of the explorer ``element_id`` (the first one when None) in an HTML page."""
    for match in re.finditer(r'<script type="application/json" data-role="payload" '
                             r'data-for="([^"]+)">(.*?)</script>', page, re.S):
        if element_id is None or match.group(1) == element_id:
            return _unpack(json.loads(match.group(2)))
    wanted = "pose explorer" if element_id is None else f"pose explorer {element_id}"
    raise ValueError(f"no {wanted} found in the page")


def pose_explorer_html(model: nn.Module, images: torch.Tensor, names: list[str] | None = None,
                       **options) -> str:
    """The browser explorer for the predicted capsules of ``images`` (N, 1, 28, 28) in [0, 1].

    Runs ``model`` once to get each image's predicted capsule and class, then returns
    :func:`explorer_html` of :func:`build_payload` with ``model.decoder``; ``options`` go to
    :func:`explorer_html`.
    """
    poses, classes = predicted_capsules(model, images)
    payload = build_payload(model.decoder, poses.cpu(), classes.cpu(), images.cpu(), names)
    return explorer_html(payload, **options)


_SLIDER = """<div class="pex-row">
<label for="{id}-dim-{e}">dimension {e}</label>
<span class="pex-end" aria-hidden="true">-{limit:.2f}</span>
<input type="range" id="{id}-dim-{e}" data-dimension="{e}"
 min="-{limit}" max="{limit}" step="{step}" value="0">
<span class="pex-end" aria-hidden="true">+{limit:.2f}</span>
<output id="{id}-dim-{e}-value" for="{id}-dim-{e}" data-role="value">+0.00</output>
</div>"""

_PAGE = """<div id="{id}" class="pose-explorer" data-pose-explorer="{id}">
<style>
#{id} {{ font: 14px/1.4 system-ui, sans-serif; border: 1px solid #ccc; border-radius: 6px;
  padding: 12px; margin: 8px 0; max-width: 760px; }}
#{id} .pex-top {{ display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }}
#{id} figure {{ margin: 0; text-align: center; }}
#{id} canvas {{ width: {size}px; height: {size}px; image-rendering: pixelated;
  border: 1px solid #999; background: #fff; }}
#{id} .pex-controls {{ display: flex; flex-direction: column; gap: 8px; }}
#{id} .pex-sliders {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr));
  gap: 2px 16px; margin-top: 10px; }}
#{id} .pex-row {{ display: flex; align-items: center; gap: 6px; }}
#{id} .pex-row label {{ width: 104px; white-space: nowrap; }}
#{id} .pex-row input {{ flex: 1; min-width: 100px; }}
#{id} .pex-end {{ font-size: 11px; color: #666; }}
#{id} output {{ width: 44px; text-align: right; font-variant-numeric: tabular-nums; }}
</style>
<div class="pex-top">
<figure><canvas id="{id}-input" data-role="input" width="{side}" height="{side}"></canvas>
<figcaption>input</figcaption></figure>
<figure><canvas id="{id}-reconstruction" data-role="reconstruction"
 width="{side}" height="{side}"></canvas>
<figcaption>decoded from the capsule</figcaption></figure>
<div class="pex-controls">
<label for="{id}-digit">test digit</label>
<select id="{id}-digit" data-role="digit">
{options}
</select>
<button type="button" id="{id}-reset" data-role="reset">reset all dimensions to 0</button>
<p id="{id}-status" data-role="status">The explorer starts when the page's script runs.</p>
</div>
</div>
<div class="pex-sliders" role="group" aria-label="offsets added to the capsule's pose dimensions">
{sliders}
</div>
<script type="application/json" data-role="payload" data-for="{id}">{spec}</script>
<script>{script}</script>
</div>"""

_SCRIPT = r"""
(() => {
  "use strict";
  const root = document.getElementById(__ROOT_ID__);
  if (!root || root.dataset.ready) return;
  const status = root.querySelector('[data-role="status"]');

  function halfToFloat(h) {
    const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
    if (exponent === 0) return sign * fraction * Math.pow(2, -24);
    if (exponent === 31) return fraction ? 0 / 0 : sign / 0;          // not finite
    return sign * (1 + fraction / 1024) * Math.pow(2, exponent - 15);
  }

  function decodeBlob(text, alphabet) {         // base64 over the payload's own alphabet
    const value = new Uint8Array(128);
    for (let k = 0; k < 64; k++) value[alphabet.charCodeAt(k)] = k;
    const padding = text.endsWith("==") ? 2 : text.endsWith("=") ? 1 : 0;
    const bytes = new Uint8Array(text.length / 4 * 3 - padding);
    for (let i = 0, o = 0; i < text.length; i += 4) {
      const bits = value[text.charCodeAt(i)] << 18 | value[text.charCodeAt(i + 1)] << 12 |
        value[text.charCodeAt(i + 2)] << 6 | value[text.charCodeAt(i + 3)];
      bytes[o++] = bits >> 16;
      if (o < bytes.length) bytes[o++] = (bits >> 8) & 255;
      if (o < bytes.length) bytes[o++] = bits & 255;
    }
    return bytes;
  }

  function unpack(spec) {
    const bytes = decodeBlob(spec.blob, spec.alphabet);
    const data = new DataView(bytes.buffer), halves = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) halves[h] = halfToFloat(h);
    return name => {
      const entry = spec.arrays[name], at = entry.offset;
      const n = entry.shape.reduce((a, b) => a * b, 1);
      if (entry.dtype === "uint8") return bytes.subarray(at, at + n);
      const out = new Float32Array(n);
      if (entry.dtype === "float16")
        for (let k = 0; k < n; k++) out[k] = halves[bytes[at + 2 * k] | (bytes[at + 2 * k + 1] << 8)];
      else
        for (let k = 0; k < n; k++) out[k] = data.getFloat32(at + 4 * k, true);
      return out;
    };
  }

  function start() {
    const spec = JSON.parse(root.querySelector('script[data-role="payload"]').textContent);
    const array = unpack(spec), E = spec.dims, side = spec.side, L = spec.layers;
    const columns = array("columns"), H1 = spec.arrays.columns.shape[1];
    const weights = [null], biases = [array("bias0")], sizes = [H1];
    for (let l = 1; l < L; l++) {
      weights.push(array("weight" + l));
      biases.push(array("bias" + l));
      sizes.push(spec.arrays["weight" + l].shape[0]);
    }
    const activations = sizes.map(n => new Float32Array(n));
    const poses = array("poses"), images = array("images");
    const slotOf = new Map(spec.classes.map((c, s) => [c, s]));
    const offsets = new Float32Array(E), pose = new Float32Array(E);
    const sliders = Array.from(root.querySelectorAll('input[type="range"][data-dimension]'));
    const digit = root.querySelector('[data-role="digit"]');
    const input = root.querySelector('[data-role="input"]').getContext("2d");
    const output = root.querySelector('[data-role="reconstruction"]').getContext("2d");

    // The decoder on one capsule v of class slot s: h1 = relu(W1[:, s] v + b1), then
    // h_l = relu(W_l h_(l-1) + b_l), and the image is the sigmoid of the last layer. Each dot
    // product is summed in double precision and stored as float32 (Float32Array).
    function decode(v, s) {
      let x = activations[0];
      const b0 = biases[0], base = s * H1 * E;
      for (let r = 0; r < H1; r++) {
        let acc = b0[r];
        for (let e = 0, at = base + r * E; e < E; e++) acc += columns[at + e] * v[e];
        x[r] = acc > 0 ? acc : 0;
      }
      for (let l = 1; l < L; l++) {
        const W = weights[l], b = biases[l], y = activations[l], nIn = sizes[l - 1];
        const last = l === L - 1;
        for (let r = 0; r < sizes[l]; r++) {
          let acc = b[r];
          for (let k = 0, at = r * nIn; k < nIn; k++) acc += W[at + k] * x[k];
          y[r] = last ? 1 / (1 + Math.exp(-acc)) : (acc > 0 ? acc : 0);
        }
        x = y;
      }
      return x;
    }

    function paint(context, grey) {
      const image = context.createImageData(side, side);
      for (let k = 0; k < side * side; k++) {
        image.data[4 * k] = image.data[4 * k + 1] = image.data[4 * k + 2] = grey(k);
        image.data[4 * k + 3] = 255;
      }
      context.putImageData(image, 0, 0);
    }

    function render() {
      const i = Number(digit.value);
      let square = 0;
      for (let e = 0; e < E; e++) {
        pose[e] = poses[i * E + e] + offsets[e];                   // rounded to float32
        square += pose[e] * pose[e];
      }
      const pixels = decode(pose, slotOf.get(spec.labels[i]));
      paint(output, k => Math.round(255 * (1 - pixels[k])));      // cmap "binary": 1 is black
      status.textContent = "decoded as class " + spec.labels[i] + "; capsule length " +
        Math.sqrt(square).toFixed(3);
    }

    function showDigit() {
      const i = Number(digit.value);
      paint(input, k => 255 - images[i * side * side + k]);
      render();
    }

    const readouts = sliders.map(slider => root.querySelector("#" + slider.id + "-value"));
    const show = (k, value) => {
      readouts[k].textContent = (value < 0 ? "" : "+") + value.toFixed(2);
    };
    sliders.forEach((slider, k) => slider.addEventListener("input", () => {
      offsets[Number(slider.dataset.dimension)] = Number(slider.value);
      show(k, Number(slider.value));
      render();
    }));
    digit.addEventListener("change", showDigit);
    root.querySelector('[data-role="reset"]').addEventListener("click", () => {
      sliders.forEach((slider, k) => {
        slider.value = 0;
        offsets[Number(slider.dataset.dimension)] = 0;
        show(k, 0);
      });
      render();
    });
    showDigit();
    root.dataset.ready = "true";
  }

  try {
    start();
  } catch (failure) {
    status.textContent = "The explorer could not start: " + failure.message;
    root.dataset.ready = "failed";
    throw failure;
  }
})();
"""
