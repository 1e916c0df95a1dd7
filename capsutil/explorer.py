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

The page side lives in real JavaScript files shipped with the package, ``capsutil/assets/``:
``core.js`` (decoding the payload, float16 and int8 arrays, matrix-vector products, the decoder,
routing by agreement, drawing a digit) and one file per explorer (``pose-explorer.js`` here,
``routing-explorer.js`` for :mod:`capsutil.routing_explorer`). :func:`asset_scripts` inlines
them into each block, whose last script starts its explorer; the files guard themselves, so
they run once per page however many explorers carry them. The helpers that pack arrays into a
payload (:func:`pack_arrays`, :func:`unpack_arrays`) and find it again (:func:`find_payload`)
serve both explorers.

Index letters as in :mod:`capsutil.layers`: ``j`` parent capsule (a class), ``e`` pose component.
"""
from __future__ import annotations

import base64
import html as html_lib
import json
import math
import re
import zlib
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch
from torch import nn

from capsutil.classifier import eval_mode
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
# Each array's dtype in the payload and its little-endian layout.
LAYOUTS = {"float16": "<f2", "float32": "<f4", "int8": "i1", "uint8": "u1"}
PAYLOAD_TAG = re.compile(r'<script type="application/json" data-role="payload" '
                         r'data-for="([^"]+)">(.*?)</script>', re.S)


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
    poses, classes = [], []
    with eval_mode(model):
        for chunk in images.split(batch_size):
            output = model(chunk.to(device))
            index = output.predictions                                  # (B,)
            poses.append(output.poses[torch.arange(len(index), device=device), index])  # (B, E)
            classes.append(index)
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


def as_uint8_images(images: torch.Tensor, n: int, side: int) -> np.ndarray:
    """``images`` (n, side, side), (n, 1, side, side) or (n, side*side), uint8 or float in
    [0, 1], as uint8 (n, side, side)."""
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
            images=as_uint8_images(images, len(poses), side), names=tuple(names))


# ----------------------------------------------------------------------------------------------
# Into HTML and back
# ----------------------------------------------------------------------------------------------

def pack_arrays(arrays: dict[str, np.ndarray], compress: bool = False) -> dict:
    """The arrays as a payload's JSON fields: ``arrays``, a manifest of each array's dtype, shape
    and byte offset, and ``blob``, all of them end to end in little-endian order, base64-encoded
    over :data:`BLOB_ALPHABET`. With ``compress`` the bytes are zlib-compressed before encoding
    (``"compression": "deflate"``, which the browser's ``DecompressionStream`` reads)."""
    manifest, chunks, offset = {}, [], 0
    for name, array in arrays.items():
        label = array.dtype.name
        if label not in LAYOUTS:
            raise ValueError(f"expected arrays of dtype {', '.join(LAYOUTS)}; {name} is {label}")
        raw = np.ascontiguousarray(array, dtype=LAYOUTS[label]).tobytes()
        manifest[name] = {"dtype": label, "shape": list(array.shape), "offset": offset}
        chunks.append(raw)
        offset += len(raw)
    data = b"".join(chunks)
    if compress:
        data = zlib.compress(data, 9)
    return {"arrays": manifest, "compression": "deflate" if compress else None,
            "alphabet": BLOB_ALPHABET,
            "blob": base64.b64encode(data).translate(_TO_BLOB).decode("ascii")}


def unpack_arrays(spec: dict) -> dict[str, np.ndarray]:
    """The arrays of a payload written by :func:`pack_arrays`, by name."""
    data = base64.b64decode(spec["blob"].encode("ascii").translate(_FROM_BLOB))
    if spec.get("compression") == "deflate":
        data = zlib.decompress(data)
    arrays = {}
    for name, entry in spec["arrays"].items():
        count = math.prod(entry["shape"])
        arrays[name] = np.frombuffer(data, LAYOUTS[entry["dtype"]], count, entry["offset"]) \
            .reshape(entry["shape"]).astype(entry["dtype"])
    return arrays


def payload_script(spec: dict, element_id: str) -> str:
    """The payload as a JSON ``<script>`` of the block ``element_id`` (``<`` escaped, so no
    caption can close it)."""
    text = json.dumps(spec, separators=(",", ":")).replace("<", "\\u003c")
    return f'<script type="application/json" data-role="payload" data-for="{element_id}">' \
           f'{text}</script>'


def find_payload(page: str, payload_format: str, element_id: str | None = None,
                 what: str = "pose explorer") -> dict:
    """The JSON payload of format ``payload_format`` of the block ``element_id`` (the first
    such block when None) in an HTML page; ``what`` names the explorer in the message raised
    when there is none."""
    for match in PAYLOAD_TAG.finditer(page):
        if element_id is None or match.group(1) == element_id:
            spec = json.loads(match.group(2))
            if spec.get("format") == payload_format:
                return spec
    wanted = what if element_id is None else f"{what} {element_id}"
    raise ValueError(f"no {wanted} found in the page")


def asset_text(name: str) -> str:
    """The text of ``capsutil/assets/<name>``, checked to be safe inline in a ``<script>`` or
    ``<style>`` element (nothing in it can close the element)."""
    text = resources.files("capsutil").joinpath("assets", name).read_text(encoding="utf-8")
    if "</" in text or "<!--" in text:
        raise ValueError(f"capsutil/assets/{name} would close its element early")
    return text


def asset_scripts(*names: str) -> str:
    """One ``<script data-capsutil-asset=...>`` per asset file: ``core.js``, then ``names``."""
    return "\n".join(f'<script data-capsutil-asset="{name[:-3]}">\n{asset_text(name)}</script>'
                     for name in ("core.js", *names))


def check_element_id(element_id: str) -> None:
    """Raise ``ValueError`` unless ``element_id`` can prefix every id of a block."""
    if not isinstance(element_id, str) or not ELEMENT_ID.match(element_id):
        raise ValueError(f"expected an HTML id of letters, digits, '-' and '_' starting with a "
                         f"letter, got {element_id!r}")


def _pack(payload: ExplorerPayload) -> dict:
    """The JSON the page carries: a manifest of typed arrays inside one base64 blob."""
    arrays = {"columns": payload.columns, "poses": payload.poses, "images": payload.images}
    arrays |= {f"weight{k + 1}": w for k, w in enumerate(payload.weights)}
    arrays |= {f"bias{k}": b for k, b in enumerate(payload.biases)}
    return {"format": PAYLOAD_FORMAT, "caps": payload.n_caps, "dims": payload.poses.shape[1],
            "side": payload.side, "layers": len(payload.biases),
            "classes": payload.classes.tolist(), "labels": payload.labels.tolist(),
            "names": list(payload.names), **pack_arrays(arrays)}


def _unpack(spec: dict) -> ExplorerPayload:
    array = unpack_arrays(spec)
    layers = spec["layers"]
    return ExplorerPayload(
        classes=np.array(spec["classes"], np.int64), columns=array["columns"],
        weights=tuple(array[f"weight{k}"] for k in range(1, layers)),
        biases=tuple(array[f"bias{k}"] for k in range(layers)), n_caps=spec["caps"],
        poses=array["poses"], labels=np.array(spec["labels"], np.int64),
        images=array["images"], names=tuple(spec["names"]))


def explorer_html(payload: ExplorerPayload, element_id: str = "pose-explorer",
                  limit: float = 0.5, step: float = 0.01, scale: int = 8,
                  max_bytes: int = MAX_PAGE_BYTES) -> str:
    """The explorer as one HTML block (display it with ``IPython.display.HTML``).

    Sliders run from ``-limit`` to ``+limit`` in steps of ``step``; canvases are side x side
    pixels shown ``scale`` times larger. Every id in the block starts with ``element_id``
    (``<id>-dim-3``, ``<id>-digit``, ``<id>-reset``, ``<id>-reconstruction``), so several
    explorers can share a page. Raises ``ValueError`` if the block exceeds ``max_bytes``.
    """
    check_element_id(element_id)
    if not (isinstance(limit, (int, float)) and isinstance(step, (int, float))
            and 0 < step <= limit and math.isfinite(limit)):
        raise ValueError(f"expected 0 < step <= limit, got step {step!r}, limit {limit!r}")
    if not isinstance(scale, int) or isinstance(scale, bool) or scale < 1:
        raise ValueError(f"expected a positive integer scale, got {scale!r}")
    sliders = "\n".join(_SLIDER.format(id=element_id, e=e, limit=limit, step=step)
                        for e in range(payload.poses.shape[1]))
    options = "\n".join(f'<option value="{k}">{html_lib.escape(name)}</option>'
                        for k, name in enumerate(payload.names))
    size = payload.side * scale
    block = _PAGE.format(id=element_id, sliders=sliders, options=options, side=payload.side,
                         size=size, payload=payload_script(_pack(payload), element_id),
                         assets=asset_scripts("pose-explorer.js"), root=json.dumps(element_id))
    n_bytes = len(block.encode("utf-8"))
    if n_bytes > max_bytes:
        raise ValueError(f"the explorer takes {n_bytes:,} bytes, over the budget of "
                         f"{max_bytes:,}; show fewer classes or a smaller decoder")
    return block


def read_payload(page: str, element_id: str | None = None) -> ExplorerPayload:
    """The payload of the explorer ``element_id`` (the first one when None) in an HTML page."""
    return _unpack(find_payload(page, PAYLOAD_FORMAT, element_id, "pose explorer"))


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
{payload}
{assets}
<script>capsutil.poseExplorer.start(document.getElementById({root}));</script>
</div>"""
