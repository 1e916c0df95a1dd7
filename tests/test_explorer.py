"""The pose explorers of chapter 06: the static HTML page (no browser here) and the Jupyter widget."""
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from capsutil import explorer, widgets
from capsutil.layers import Decoder
from capsutil.models import CapsNet

TINY = dict(conv_channels=8, primary_maps=4, primary_dims=4, digit_dims=6, decoder_hidden=(16, 32))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = CapsNet(**TINY).eval()
    images = torch.rand(4, 1, 28, 28)
    return model, images


@pytest.fixture(scope="module")
def paper_page():
    """The explorer of the paper-size decoder (160 -> 512 -> 1024 -> 784) for one digit per class."""
    torch.manual_seed(0)
    decoder = Decoder()
    poses = 0.3 * torch.randn(10, 16)
    classes = torch.arange(10)
    images = torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8)
    payload = explorer.build_payload(decoder, poses, classes, images,
                                     [f"digit {c}" for c in range(10)])
    return decoder, poses, classes, explorer.explorer_html(payload)


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text inside each <label>."""

    def __init__(self):
        super().__init__()
        self.tags, self.labels, self._label = [], {}, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "label":
            self._label = attrs.get("for")
            self.labels[self._label] = ""

    def handle_endtag(self, tag):
        if tag == "label":
            self._label = None

    def handle_data(self, data):
        if self._label is not None:
            self.labels[self._label] += data


def parse(page: str) -> Elements:
    elements = Elements()
    elements.feed(page)
    return elements


def test_paper_size_explorer_fits_the_page_budget(paper_page):
    *_, page = paper_page
    assert len(page.encode("utf-8")) <= explorer.MAX_PAGE_BYTES == 4_000_000


def test_explorer_is_self_contained_with_nothing_to_fetch(paper_page):
    *_, page = paper_page
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    for forbidden in ("fetch(", "XMLHttpRequest", "import(", "<link", "WebSocket", "http://",
                      "https://"):
        assert forbidden not in page
    scripts = [attrs for tag, attrs in parse(page).tags if tag == "script"]
    assert scripts and all("src" not in attrs for attrs in scripts)


def test_page_scripts_are_the_shipped_asset_files_each_guarded_to_run_once(paper_page):
    *_, page = paper_page
    for name in ("core.js", "pose-explorer.js"):
        text = explorer.asset_text(name)
        assert page.count(f'<script data-capsutil-asset="{name[:-3]}">\n{text}</script>') == 1
        assert f'if (capsutil.assets.includes("{name[:-3]}")) return;' in text
    assert page.rstrip().endswith('<script>capsutil.poseExplorer.start('
                                  'document.getElementById("pose-explorer"));</script>\n</div>')


def test_the_assets_ship_as_package_data():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")                         # Python 3.11 and later

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert {"assets/*.js", "assets/*.css"} <= set(
        project["tool"]["setuptools"]["package-data"]["capsutil"])


def test_megabytes_of_encoded_weights_spell_no_path_or_failure_word(paper_page):
    *_, page = paper_page
    for word in ("nan", "inf", "error", "warning", "traceback", "/tmp", "/work", "/root"):
        assert word not in page.lower()


def test_embedded_weights_decode_to_the_decoders_float16_weights(paper_page):
    decoder, poses, classes, page = paper_page
    payload = explorer.read_payload(page)
    linears = explorer.decoder_layers(decoder)
    half = [linear.weight.detach().half().numpy() for linear in linears]
    assert payload.columns.dtype == np.float16 and payload.columns.shape == (10, 512, 16)
    for c in range(10):
        np.testing.assert_array_equal(payload.columns[c], half[0][:, 16 * c:16 * (c + 1)])
    for stored, expected in zip(payload.weights, half[1:]):
        np.testing.assert_array_equal(stored, expected)
    for stored, linear in zip(payload.biases, linears):
        np.testing.assert_array_equal(stored, linear.bias.detach().half().numpy())
    np.testing.assert_array_equal(payload.poses, poses.numpy())
    np.testing.assert_array_equal(payload.labels, classes.numpy())


def test_page_decoder_equals_the_model_decoder_on_float16_rounded_weights(paper_page):
    decoder, poses, classes, page = paper_page
    rounded = Decoder()
    rounded.load_state_dict({k: v.half().float() for k, v in decoder.state_dict().items()})
    from_page = explorer.read_payload(page).decoder()
    torch.testing.assert_close(explorer.decode_capsules(from_page, poses, classes),
                               explorer.decode_capsules(rounded, poses, classes), rtol=0, atol=0)


def test_only_the_first_layer_columns_of_the_shown_classes_travel(tiny):
    model, _ = tiny
    poses, classes = torch.randn(3, 6), torch.tensor([7, 2, 7])
    payload = explorer.build_payload(model.decoder, poses, classes, torch.zeros(3, 28, 28))
    np.testing.assert_array_equal(payload.classes, [2, 7])
    assert payload.columns.shape == (2, 16, 6)
    from_page = payload.decoder()
    expected = explorer.decode_capsules(model.decoder, poses, classes)
    torch.testing.assert_close(explorer.decode_capsules(from_page, poses, classes), expected,
                               rtol=0, atol=2e-3)


def test_sliders_are_labelled_ranges_with_visible_bounds_and_values(paper_page):
    *_, page = paper_page
    elements = parse(page)
    sliders = [attrs for tag, attrs in elements.tags
               if tag == "input" and attrs.get("type") == "range"]
    assert [int(s["data-dimension"]) for s in sliders] == list(range(16))
    for e, slider in enumerate(sliders):
        assert slider["id"] == f"pose-explorer-dim-{e}"
        assert elements.labels[slider["id"]] == f"dimension {e}"
        assert (float(slider["min"]), float(slider["max"]), float(slider["value"])) == (-0.5, 0.5, 0)
        assert f'<output id="{slider["id"]}-value" for="{slider["id"]}"' in page
    assert '<span class="pex-end" aria-hidden="true">-0.50</span>' in page
    assert elements.labels["pose-explorer-digit"] == "test digit"
    ids = {attrs["id"] for tag, attrs in elements.tags if "id" in attrs}
    assert {"pose-explorer-reconstruction", "pose-explorer-input", "pose-explorer-reset",
            "pose-explorer-digit"} <= ids
    assert all(i.startswith("pose-explorer") for i in ids)


def test_slider_range_and_element_id_are_configurable(tiny):
    model, images = tiny
    page = explorer.pose_explorer_html(model, images, element_id="second", limit=0.25, step=0.05)
    slider = next(attrs for tag, attrs in parse(page).tags if attrs.get("id") == "second-dim-0")
    assert (slider["min"], slider["max"], slider["step"]) == ("-0.25", "0.25", "0.05")
    assert explorer.read_payload(page, "second").poses.shape == (4, 6)
    with pytest.raises(ValueError, match="no pose explorer other found"):
        explorer.read_payload(page, "other")


def test_predicted_capsules_are_the_longest_capsule_of_each_image(tiny):
    model, images = tiny
    poses, classes = explorer.predicted_capsules(model, images, batch_size=3)
    output = model(images)
    torch.testing.assert_close(classes, output.lengths.argmax(1))
    torch.testing.assert_close(poses, output.poses[torch.arange(4), classes])


def test_decode_capsules_matches_the_models_test_time_reconstruction(tiny):
    model, images = tiny
    poses, classes = explorer.predicted_capsules(model, images)
    torch.testing.assert_close(explorer.decode_capsules(model.decoder, poses, classes),
                               model(images).reconstructions)


def test_pose_sweep_moves_one_dimension_by_each_offset(tiny):
    model, images = tiny
    poses, classes = explorer.predicted_capsules(model, images)
    sweep = widgets.pose_sweep(model.decoder, poses, classes, [-0.2, 0.0, 0.1])
    assert sweep.shape == (4, 6, 3, 784)
    moved = poses[2].clone()
    moved[4] += 0.1
    torch.testing.assert_close(sweep[2, 4, 2], explorer.decode_capsules(
        model.decoder, moved[None], classes[2:3])[0])
    for e in range(6):
        torch.testing.assert_close(sweep[:, e, 1], model(images).reconstructions)


@pytest.mark.parametrize("call, message", [
    (lambda d: explorer.build_payload(d, torch.zeros(2, 7), torch.zeros(2, dtype=torch.long),
                                      torch.zeros(2, 28, 28)), "not a multiple of 7-D"),
    (lambda d: explorer.build_payload(d, torch.zeros(2, 16), torch.tensor([0, 10]),
                                      torch.zeros(2, 28, 28)), r"classes in \[0, 10\)"),
    (lambda d: explorer.build_payload(d, torch.zeros(2, 16), torch.tensor([0.0, 1.0]),
                                      torch.zeros(2, 28, 28)), "int64 classes"),
    (lambda d: explorer.build_payload(d, torch.zeros(2, 16), torch.tensor([0]),
                                      torch.zeros(2, 28, 28)), r"classes of shape \(2,\)"),
    (lambda d: explorer.build_payload(d, torch.zeros(16), torch.tensor([0]),
                                      torch.zeros(1, 28, 28)), r"poses of shape \(N, E\)"),
    (lambda d: explorer.build_payload(d, torch.zeros(0, 16), torch.zeros(0, dtype=torch.long),
                                      torch.zeros(0, 28, 28)), "at least one digit"),
    (lambda d: explorer.build_payload(d, torch.zeros(2, 16), torch.tensor([0, 1]),
                                      torch.zeros(2, 27, 27)), r"images of shape \(2, 28, 28\)"),
    (lambda d: explorer.build_payload(d, torch.zeros(2, 16), torch.tensor([0, 1]),
                                      torch.full((2, 28, 28), 2.0)), r"float images in \[0, 1\]"),
    (lambda d: explorer.build_payload(d, torch.zeros(2, 16), torch.tensor([0, 1]),
                                      torch.zeros(2, 28, 28), ["only one"]), "expected 2 captions"),
    (lambda d: explorer.build_payload(d, torch.full((1, 16), float("nan")), torch.tensor([0]),
                                      torch.zeros(1, 28, 28)), "expected finite poses"),
    (lambda d: explorer.build_payload(torch.nn.Linear(160, 784), torch.zeros(1, 16),
                                      torch.tensor([0]), torch.zeros(1, 28, 28)),
     "expected a capsutil.layers.Decoder"),
])
def test_bad_inputs_raise_value_errors_that_say_what_was_expected(call, message):
    with pytest.raises(ValueError, match=message):
        call(Decoder())


def test_decoders_other_than_linear_relu_sigmoid_are_refused():
    decoder = Decoder()
    decoder.net[1] = torch.nn.Tanh()
    with pytest.raises(ValueError, match=r"Linear, \(ReLU, Linear\)\*, Sigmoid; got Linear, Tanh"):
        explorer.decoder_layers(decoder)


@pytest.mark.parametrize("options, message", [
    ({"element_id": "3d"}, "expected an HTML id"),
    ({"element_id": "a b"}, "expected an HTML id"),
    ({"limit": 0.1, "step": 0.2}, "0 < step <= limit"),
    ({"step": 0}, "0 < step <= limit"),
    ({"scale": 0}, "positive integer scale"),
    ({"max_bytes": 1000}, "over the budget of 1,000"),
])
def test_bad_page_options_raise(tiny, options, message):
    model, _ = tiny
    payload = explorer.build_payload(model.decoder, torch.zeros(1, 6), torch.tensor([0]),
                                     torch.zeros(1, 28, 28))
    with pytest.raises(ValueError, match=message):
        explorer.explorer_html(payload, **options)


def test_captions_cannot_close_the_script_that_carries_them(tiny):
    model, _ = tiny
    caption = 'a "7" </script><script>alert(1)</script>'
    payload = explorer.build_payload(model.decoder, torch.zeros(1, 6), torch.tensor([7]),
                                     torch.zeros(1, 28, 28), [caption])
    page = explorer.explorer_html(payload)
    # the payload, core.js, pose-explorer.js and the line that starts the explorer
    assert page.count("</script>") == page.count("<script") == 4
    assert "<script>alert" not in page
    assert explorer.read_payload(page).names == (caption,)


def test_read_payload_raises_on_a_page_without_an_explorer():
    with pytest.raises(ValueError, match="no pose explorer found"):
        explorer.read_payload("<html><body>nothing here</body></html>")


def test_jupyter_explorer_redecodes_on_every_slider_move_and_resets(tiny):
    model, images = tiny
    view = widgets.PoseExplorer(model, images, names=[f"image {k}" for k in range(4)])
    assert [s.description for s in view.sliders] == [f"dimension {e}" for e in range(6)]
    poses, classes = explorer.predicted_capsules(model, images)
    start = view.reconstruction.copy()
    np.testing.assert_allclose(start.ravel(), model(images[:1]).reconstructions[0].detach().numpy(),
                               atol=1e-6)
    view.sliders[3].value = 0.3
    moved = poses[0].clone()
    moved[3] += 0.3
    expected = explorer.decode_capsules(model.decoder, moved[None], classes[:1])[0]
    np.testing.assert_allclose(view.reconstruction.ravel(), expected.numpy(), atol=1e-6)
    assert not np.allclose(view.reconstruction, start)
    view.digit.value = 2
    moved = poses[2].clone()
    moved[3] += 0.3
    expected = explorer.decode_capsules(model.decoder, moved[None], classes[2:3])[0]
    np.testing.assert_allclose(view.reconstruction.ravel(), expected.numpy(), atol=1e-6)
    view.reset()
    assert all(s.value == 0 for s in view.sliders)
    np.testing.assert_allclose(view.reconstruction.ravel(),
                               model(images[2:3]).reconstructions[0].detach().numpy(), atol=1e-6)
    assert bytes(view.output_image.value).startswith(b"\x89PNG")


def test_draw_pose_grid_draws_one_mosaic_tile_per_dimension_and_offset(tiny):
    import matplotlib.pyplot as plt

    model, images = tiny
    poses, classes = explorer.predicted_capsules(model, images)
    sweep = widgets.pose_sweep(model.decoder, poses, classes)        # (4, 6, 11, 784)
    fig, ax = plt.subplots()
    widgets.draw_pose_grid(ax, sweep[0])
    mosaic = ax.images[0].get_array()
    assert mosaic.shape == (6 * 30 - 2, 11 * 30 - 2)
    np.testing.assert_allclose(mosaic[30:58, 60:88], sweep[0, 1, 2].reshape(28, 28).numpy())
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "-0.25"
    plt.close(fig)
    with pytest.raises(ValueError, match=r"expected images of shape \(E, 11, pixels\)"):
        widgets.draw_pose_grid(ax, sweep[0, :, :5])
