"""The explorers in a real browser: headless Chromium, the keyboard and the mouse.

The pose explorer of chapter 06: opens ``notebooks/06_pose_parameters.html`` of the built book
(see ``browser_support``), moves sliders and checks the canvas against PyTorch's decoder run on
the weights the page carries. The routing explorer, and a page holding both explorers: pages
written here from the trained CapsNet and digits of the shipped sample, checked against
PyTorch's float32 model (couplings and lengths within 1e-3, pixels within 2 grey levels).
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from browser_support import built_page, chromium
from capsutil import explorer

EXPLORER = "pose-explorer"
TOLERANCE = 2                                    # grey levels out of 255


@pytest.fixture(scope="module")
def page():
    return built_page("notebooks/06_pose_parameters.html")


@pytest.fixture(scope="module")
def page_payload(page):
    return explorer.read_payload(page.read_text(encoding="utf-8"), EXPLORER)


@pytest.fixture(scope="module")
def browser(page, page_payload):
    from selenium.webdriver.support.ui import WebDriverWait

    with chromium() as driver:
        driver.get(page.as_uri())
        WebDriverWait(driver, 10).until(
            lambda d: d.find_element("id", EXPLORER).get_attribute("data-ready"))
        yield driver


def canvas_grey(driver, canvas_id: str = f"{EXPLORER}-reconstruction") -> np.ndarray:
    """A canvas's pixels as grey levels (side, side), read with getImageData; by default the
    pose explorer's reconstruction."""
    rgba = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);",
        canvas_id)
    rgba = np.asarray(rgba, dtype=np.int64)
    side = int(np.sqrt(len(rgba) // 4))
    pixels = rgba.reshape(side, side, 4)
    assert (pixels[..., 3] == 255).all() and (pixels[..., 0] == pixels[..., 2]).all()
    return pixels[..., 0]


def expected_grey(payload, digit: int, offsets: np.ndarray) -> np.ndarray:
    """PyTorch's decoder on the page's weights, for the digit's capsule plus ``offsets``, shown
    as the page shows it (cmap "binary": grey = 255 (1 - pixel))."""
    pose = torch.from_numpy(payload.poses[digit] + offsets.astype(np.float32))        # (E,)
    label = torch.tensor([payload.labels[digit]])
    with torch.no_grad():
        pixels = explorer.decode_capsules(payload.decoder(), pose[None], label)[0]    # (P,)
    return np.round(255 * (1 - pixels.numpy().astype(np.float64))).reshape(payload.side, -1)


def mismatch(driver, payload, digit: int, offsets: np.ndarray) -> int:
    """Largest difference, in grey levels, between the canvas and PyTorch's decoder."""
    return int(np.abs(canvas_grey(driver) - expected_grey(payload, digit, offsets)).max())


def slider_offsets(driver, dims: int) -> np.ndarray:
    values = driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(s => s.value);",
        f"#{EXPLORER} input[type=range][data-dimension]")
    assert len(values) == dims
    return np.array([float(v) for v in values])


def test_page_starts_and_draws_the_unperturbed_reconstruction(browser, page_payload):
    assert browser.find_element("id", EXPLORER).get_attribute("data-ready") == "true"
    dims = page_payload.poses.shape[1]
    assert mismatch(browser, page_payload, 0, np.zeros(dims)) <= TOLERANCE


def test_arrow_keys_move_a_slider_and_the_canvas_matches_pytorch(browser, page_payload):
    from selenium.webdriver.common.keys import Keys

    dims = page_payload.poses.shape[1]
    before = canvas_grey(browser)
    slider = browser.find_element("id", f"{EXPLORER}-dim-3")
    browser.execute_script("arguments[0].focus();", slider)
    for _ in range(10):
        slider.send_keys(Keys.ARROW_RIGHT)
    assert float(slider.get_attribute("value")) == pytest.approx(0.10)
    assert browser.find_element("id", f"{EXPLORER}-dim-3-value").text == "+0.10"
    offsets = slider_offsets(browser, dims)
    assert offsets[3] == pytest.approx(0.10) and np.count_nonzero(offsets) == 1
    after = canvas_grey(browser)
    assert np.abs(after - before).max() > TOLERANCE, "the canvas did not change"
    assert np.abs(after - expected_grey(page_payload, 0, offsets)).max() <= TOLERANCE


def test_input_events_digit_chooser_and_reset_match_pytorch(browser, page_payload):
    from selenium.webdriver.support.ui import Select

    dims = page_payload.poses.shape[1]
    browser.execute_script(
        "const s = document.getElementById(arguments[0]); s.value = arguments[1];"
        "s.dispatchEvent(new Event('input', {bubbles: true}));", f"{EXPLORER}-dim-7", "-0.3")
    digit = len(page_payload.names) - 1
    Select(browser.find_element("id", f"{EXPLORER}-digit")).select_by_index(digit)
    offsets = slider_offsets(browser, dims)
    assert offsets[7] == pytest.approx(-0.3)
    assert mismatch(browser, page_payload, digit, offsets) <= TOLERANCE
    browser.find_element("id", f"{EXPLORER}-reset").click()
    assert not slider_offsets(browser, dims).any()
    assert browser.find_element("id", f"{EXPLORER}-dim-7-value").text == "+0.00"
    assert mismatch(browser, page_payload, digit, np.zeros(dims)) <= TOLERANCE


def test_redecode_time_is_measured_and_a_screenshot_is_saved(browser, page_payload, tmp_path):
    """Prints the mean time of one re-decode and redraw (an input event) over 300 events."""
    milliseconds = browser.execute_script(
        "const s = document.getElementById(arguments[0]), n = 300, t0 = performance.now();"
        "for (let k = 0; k < n; k++) { s.value = (k % 2 ? 0.25 : -0.25);"
        "  s.dispatchEvent(new Event('input', {bubbles: true})); }"
        "return (performance.now() - t0) / n;", f"{EXPLORER}-dim-5")
    assert milliseconds > 0
    print(f"\nChromium: one re-decode and redraw takes {milliseconds:.2f} ms "
          f"(mean over 300 input events)")
    shot = tmp_path / "pose_explorer.png"
    element = browser.find_element("id", EXPLORER)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    assert element.screenshot(str(shot))
    assert shot.stat().st_size > 0
    print(f"screenshot of the explorer: {shot}")


# ----------------------------------------------------------------------------------------------
# The routing explorer, and a page with both explorers, on pages written here
# ----------------------------------------------------------------------------------------------

ROUTING = "routing-explorer"
ROUTING_CLASSES = (0, 1, 2, 3, 4, 7)          # the first test-sample digit of each
COUPLING_TOLERANCE = 1e-3
VIEWPORT = '<meta name="viewport" content="width=device-width, initial-scale=1">'


def write_page(path, *blocks: str):
    """An HTML page holding ``blocks``, as a chapter of the book holds an explorer's output."""
    path.write_text(f"<!doctype html><html><head><meta charset=\"utf-8\">{VIEWPORT}</head>"
                    f"<body><main>{''.join(blocks)}</main></body></html>", encoding="utf-8")
    return path


def open_page(driver, path, *element_ids: str) -> None:
    """Open ``path`` and wait until every explorer in ``element_ids`` has started."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(path.as_uri())
    WebDriverWait(driver, 30).until(lambda d: all(
        d.find_element("id", k).get_attribute("data-ready") for k in element_ids))
    for k in element_ids:
        assert driver.find_element("id", k).get_attribute("data-ready") == "true", \
            driver.find_element("id", f"{k}-status").text


@pytest.fixture(scope="module")
def trained():
    """The trained CapsNet and six test-sample digits, one of each of ROUTING_CLASSES."""
    from capsutil import pretrained
    from capsutil.data import load_sample, to_float

    test = load_sample("test")
    first = [int(torch.nonzero(test.labels == c)[0]) for c in ROUTING_CLASSES]
    return pretrained("capsnet"), to_float(test.images[first])


@pytest.fixture(scope="module")
def routing_page(trained, tmp_path_factory):
    from capsutil import routing_explorer

    model, images = trained
    block = routing_explorer.routing_explorer_html(model, images,
                                                   [f"a {c}" for c in ROUTING_CLASSES])
    return write_page(tmp_path_factory.mktemp("routing") / "routing.html", block)


@pytest.fixture(scope="module")
def routing_browser(routing_page):
    with chromium(800, 1000) as driver:
        open_page(driver, routing_page, ROUTING)
        yield driver


@pytest.fixture(scope="module")
def float_outputs(trained):
    """PyTorch's float32 model with T = 1, ..., 5 routing iterations, couplings included."""
    import copy

    model, images = trained
    outputs = {}
    for iterations in range(1, 6):
        routed = copy.deepcopy(model)
        routed.digits.iterations = iterations
        with torch.no_grad():
            outputs[iterations] = routed(images, return_couplings=True)
    return outputs


def routing_state(driver, element_id: str = ROUTING) -> dict:
    """What the page computed last: digit, iterations, predicted class, couplings (I, J),
    lengths (J,) and the reconstruction canvas's grey levels (side, side)."""
    state = driver.execute_script(
        "const s = document.getElementById(arguments[0]).routingState;"
        "return {digit: s.digit, iterations: s.iterations, predicted: s.predicted,"
        "  couplings: Array.from(s.couplings), lengths: Array.from(s.lengths)};", element_id)
    state["couplings"] = np.asarray(state["couplings"]).reshape(-1, len(state["lengths"]))
    state["lengths"] = np.asarray(state["lengths"])
    state["grey"] = canvas_grey(driver, f"{element_id}-reconstruction")
    return state


def assert_matches_pytorch(state: dict, float_outputs) -> None:
    """The page's couplings and lengths within 1e-3 of the float32 model's, its canvas within
    2 grey levels of the model's reconstruction (drawn as the page draws it: 255 (1 - pixel))."""
    output, b = float_outputs[state["iterations"]], state["digit"]
    assert state["predicted"] == int(output.predictions[b])
    assert np.abs(state["couplings"] - output.couplings[-1][b].numpy()).max() <= COUPLING_TOLERANCE
    assert np.abs(state["lengths"] - output.lengths[b].numpy()).max() <= COUPLING_TOLERANCE
    expected = np.round(255 * (1 - output.reconstructions[b].numpy().astype(np.float64)))
    assert np.abs(state["grey"] - expected.reshape(state["grey"].shape)).max() <= TOLERANCE


def test_routing_explorer_opens_at_the_models_iterations_and_matches_pytorch(
        routing_browser, routing_page, float_outputs):
    from capsutil import routing_explorer

    state = routing_state(routing_browser)
    assert (state["digit"], state["iterations"]) == (0, 3)
    assert_matches_pytorch(state, float_outputs)
    payload = routing_explorer.read_routing_payload(routing_page.read_text(encoding="utf-8"))
    reference = routing_explorer.routing_in_payload(payload, 0, 3)
    np.testing.assert_allclose(state["couplings"], reference.couplings, rtol=0, atol=1e-7)
    np.testing.assert_allclose(state["lengths"], reference.lengths, rtol=0, atol=1e-7)
    expected = np.round(255 * (1 - reference.reconstruction)).reshape(state["grey"].shape)
    assert np.abs(state["grey"] - expected).max() <= 1
    assert not [e for e in routing_browser.get_log("browser") if e["level"] == "SEVERE"]


def test_stepping_the_iterations_and_changing_the_digit_match_pytorch(routing_browser,
                                                                       float_outputs):
    from selenium.webdriver.support.ui import Select

    click = lambda role: routing_browser.find_element("id", f"{ROUTING}-{role}").click()
    for _ in range(4):
        click("previous")
    state = routing_state(routing_browser)
    assert state["iterations"] == 1
    assert routing_browser.find_element("id", f"{ROUTING}-previous").get_attribute("disabled")
    np.testing.assert_allclose(state["couplings"], 0.1, atol=1e-12)      # uniform at T = 1
    assert_matches_pytorch(state, float_outputs)
    for iterations in range(2, 6):
        click("next")
        state = routing_state(routing_browser)
        assert state["iterations"] == iterations
        assert routing_browser.find_element("id", f"{ROUTING}-iterations-value").text == \
            f"T = {iterations}"
        assert_matches_pytorch(state, float_outputs)
    assert routing_browser.find_element("id", f"{ROUTING}-next").get_attribute("disabled")
    Select(routing_browser.find_element("id", f"{ROUTING}-digit")).select_by_index(5)
    state = routing_state(routing_browser)
    assert (state["digit"], state["iterations"], state["predicted"]) == (5, 5, 7)
    assert_matches_pytorch(state, float_outputs)
    routing_browser.execute_script(
        "const r = document.getElementById(arguments[0]); r.value = 2;"
        "r.dispatchEvent(new Event('input', {bubbles: true}));", f"{ROUTING}-iterations")
    assert_matches_pytorch(routing_state(routing_browser), float_outputs)


def test_routing_redraw_time_is_measured_and_screenshots_are_saved(routing_browser,
                                                                   routing_page):
    """Prints the mean time of one redraw (route, decode, draw) over 100 changes of T and of a
    digit change (votes too); saves the explorer at 800 px and on a 390-px phone viewport."""
    redraw, new_digit = routing_browser.execute_script(
        "const root = document.getElementById(arguments[0]);"
        "const range = root.querySelector('[data-role=iterations]');"
        "const digit = root.querySelector('[data-role=digit]');"
        "let t0 = performance.now();"
        "for (let k = 0; k < 100; k++) { range.value = 2 + k % 4;"
        "  range.dispatchEvent(new Event('input')); }"
        "const redraw = (performance.now() - t0) / 100;"
        "t0 = performance.now();"
        "for (let k = 0; k < 20; k++) {"
        "  digit.value = k % 2; digit.dispatchEvent(new Event('change')); }"
        "return [redraw, (performance.now() - t0) / 20];", ROUTING)
    assert redraw > 0 and new_digit > 0
    print(f"\nChromium: one routing explorer redraw takes {redraw:.1f} ms (mean of 100 changes "
          f"of T, T = 2..5); a new digit (votes W u too) {new_digit:.1f} ms")
    for width, name in ((800, "desktop"), (390, "phone")):
        routing_browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": 1200, "deviceScaleFactor": 2, "mobile": width < 500})
        open_page(routing_browser, routing_page, ROUTING)
        root = routing_browser.find_element("id", ROUTING)
        fits = routing_browser.execute_script(
            "const root = arguments[0], box = root.getBoundingClientRect();"
            "return [root.scrollWidth <= root.clientWidth, box.right <= window.innerWidth,"
            "  Array.from(root.querySelectorAll('canvas, button, select, input')).every(e => {"
            "    const r = e.getBoundingClientRect();"
            "    return r.width > 0 && r.left >= box.left && r.right <= box.right; })];", root)
        assert fits == [True, True, True], f"the explorer overflows at {width} px: {fits}"
        shot = Path(f"/tmp/routing_explorer_{name}.png")
        assert root.screenshot(str(shot)) and shot.stat().st_size > 0
        print(f"screenshot at {width} px: {shot}")
    routing_browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_a_page_with_both_explorers_runs_each_asset_once_and_both_respond(trained, tmp_path,
                                                                        float_outputs):
    from capsutil import routing_explorer

    model, images = trained
    names = [f"a {c}" for c in ROUTING_CLASSES]
    page = write_page(tmp_path / "both.html",
                      explorer.pose_explorer_html(model, images, names),
                      routing_explorer.routing_explorer_html(model, images, names))
    text = page.read_text(encoding="utf-8")
    assert text.count('<script data-capsutil-asset="core">') == 2        # one per block
    with chromium() as driver:
        open_page(driver, page, EXPLORER, ROUTING)
        assert driver.execute_script("return window.capsutil.assets;") == \
            ["core", "pose-explorer", "routing-explorer"]
        pose = explorer.read_payload(text)
        driver.execute_script(
            "const s = document.getElementById(arguments[0]); s.value = 0.2;"
            "s.dispatchEvent(new Event('input', {bubbles: true}));", f"{EXPLORER}-dim-4")
        offsets = np.zeros(pose.poses.shape[1])
        offsets[4] = 0.2
        assert mismatch(driver, pose, 0, offsets) <= TOLERANCE
        driver.find_element("id", f"{ROUTING}-next").click()
        state = routing_state(driver)
        assert state["iterations"] == 4
        assert_matches_pytorch(state, float_outputs)
        assert mismatch(driver, pose, 0, offsets) <= TOLERANCE           # untouched
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _book_pages() -> list[str]:
    """The built book's pages, relative to its html folder: the prose pages and the chapters."""
    from capsutil import book

    root = book.chapters()[0].parent.parent
    return ["book/intro.html", "book/setup.html", "book/references.html"] + [
        str(chapter.relative_to(root).with_suffix(".html")) for chapter in book.chapters()]


def test_every_page_of_the_built_book_fits_a_phone_screen():
    """No page is wider than a 390-px phone viewport (long inline code wraps; figures, tables
    and explorers stay inside the column or scroll within their own box)."""
    with chromium() as driver:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True})
        for relative in _book_pages():
            driver.get(built_page(relative).as_uri())
            scroll, client = driver.execute_script(
                "const e = document.documentElement; return [e.scrollWidth, e.clientWidth];")
            assert scroll <= client, f"{relative} is {scroll} px wide on a {client}-px phone"


def test_code_of_80_columns_fits_the_desktop_column_without_a_scroll_bar():
    """At 1280 px every code cell (lines of at most 80 characters) shows whole."""
    with chromium(1280, 1000) as driver:
        for relative in _book_pages():
            driver.get(built_page(relative).as_uri())
            scrolling = driver.execute_script(
                "return Array.from(document.querySelectorAll('div.cell_input pre'))"
                "  .filter(p => p.scrollWidth > p.clientWidth + 1)"
                "  .map(p => p.textContent.split('\\n')[0]);")
            assert scrolling == [], f"{relative}: code cells scroll sideways: {scrolling[:3]}"
