"""Chapter 06's pose explorer in a real browser: the built page, a headless Chromium, the keyboard.

Opens ``notebooks/06_pose_parameters.html`` of the built book (see ``browser_support``), moves
sliders and checks the canvas against PyTorch's decoder run on the weights the page carries.
"""
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


def canvas_grey(driver) -> np.ndarray:
    """The reconstruction canvas's pixels as grey levels (side, side), read with getImageData."""
    rgba = driver.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);",
        f"{EXPLORER}-reconstruction")
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
