"""The built book as readers meet it: every page over ``file://`` with no network, on a desktop
and on a 390-px phone, and every link inside the book.

Needs the built book and Chromium (see ``browser_support``).
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from bs4 import BeautifulSoup

from browser_support import BOOK_HTML, ROOT, built_page, chromium

PHONE_WIDTH = 390
SCREENSHOTS = Path(__file__).resolve().parents[1] / "_build" / "screenshots"


def toc_pages() -> list[str]:
    """The pages of ``_toc.yml`` as paths of the built book, in reading order."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]] + [chapter["file"] for part in toc.get("parts", [])
                             for chapter in part.get("chapters", [])]
    return [f"{name}.html" for name in files]


def _load(driver, page: Path) -> None:
    """Open ``page`` and wait until MathJax has typeset it (when the page uses MathJax)."""
    driver.get(page.as_uri())
    driver.set_script_timeout(30)
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const ready = () => window.MathJax && MathJax.startup && MathJax.startup.promise;"
        "const wait = (n) => ready() ? MathJax.startup.promise.then(() => done(true))"
        "  : (n > 0 ? setTimeout(() => wait(n - 1), 100) : done(false));"
        "if (document.querySelector('script[src*=\"mathjax\"]')) wait(100); else done(true);")


@pytest.fixture(scope="module")
def desktop():
    built_page(toc_pages()[0])
    with chromium() as driver:
        yield driver


@pytest.mark.parametrize("relative", toc_pages())
def test_page_loads_offline_with_no_console_error_and_every_formula_typeset(desktop, relative):
    page = built_page(relative)
    desktop.get_log("browser")                                      # forget earlier pages
    _load(desktop, page)
    errors = [entry["message"] for entry in desktop.get_log("browser")
              if entry["level"] == "SEVERE"]
    assert not errors, f"{relative}: console errors: {errors[:3]}"
    text = desktop.execute_script("return document.querySelector('main').innerText;")
    raw = [marker for marker in ("\\(", "\\[", "$$") if marker in text]
    assert not raw, f"{relative}: untypeset LaTeX ({raw}) in the rendered text"


def _visible_state(driver, element) -> str:
    """What a reader sees around a control: the nearest output's HTML and canvases' pixels."""
    return driver.execute_script(
        "const box = arguments[0].closest('.cell_output, .output, section') || document.body;"
        "const pixels = Array.from(box.querySelectorAll('canvas'))"
        "  .map(c => c.toDataURL()).join('|');"
        "return box.innerHTML.replace(/value=\"[^\"]*\"/g, '') + pixels;", element)


@pytest.mark.parametrize("relative", toc_pages())
def test_every_range_input_changes_what_the_page_shows(desktop, relative):
    _load(desktop, built_page(relative))
    sliders = desktop.find_elements("css selector", "input[type=range]")
    for slider in sliders:
        desktop.execute_script("arguments[0].scrollIntoView({block: 'center'});", slider)
        before = _visible_state(desktop, slider)
        desktop.execute_script(
            "const s = arguments[0];"
            "s.value = (Number(s.value) === Number(s.max)) ? s.min : s.max;"
            "s.dispatchEvent(new Event('input', {bubbles: true}));"
            "s.dispatchEvent(new Event('change', {bubbles: true}));", slider)
        assert _visible_state(desktop, slider) != before, \
            f"{relative}: moving slider {slider.get_attribute('id')} changed nothing visible"


@pytest.mark.parametrize("relative", [toc_pages()[0], toc_pages()[-1]])
def test_the_contents_button_opens_the_contents_on_a_phone(relative):
    page = built_page(relative)
    opened = "const d = document.getElementById('pst-primary-sidebar-modal'); return !!(d && d.open);"
    with chromium(PHONE_WIDTH, 844) as phone:
        _load(phone, page)
        assert not phone.execute_script(opened), "the contents are open before the button is pressed"
        phone.find_element("css selector", "button.sidebar-toggle.primary-toggle").click()
        assert phone.execute_script(opened), "the contents button did not open the contents"
        links = phone.find_elements("css selector", "#pst-primary-sidebar-modal a.reference.internal")
        assert links and any(link.is_displayed() for link in links)
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        phone.save_screenshot(str(SCREENSHOTS / f"phone-contents-{Path(relative).stem}.png"))


def _anchors(page: Path) -> set[str]:
    soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
    return {tag["id"] for tag in soup.find_all(id=True)}


def test_no_internal_link_is_broken():
    built_page(toc_pages()[0])
    broken, anchors = [], {}
    for relative in toc_pages():
        page = BOOK_HTML / relative
        soup = BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")
        for link in soup.find_all("a", href=True):
            parts = urlsplit(link["href"])
            if parts.scheme or parts.netloc or link["href"].startswith("mailto:"):
                continue
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if not target.is_file():
                broken.append(f"{relative}: {link['href']} (no such file)")
                continue
            if parts.fragment and target.suffix == ".html":
                known = anchors.setdefault(target, _anchors(target))
                if unquote(parts.fragment) not in known:
                    broken.append(f"{relative}: {link['href']} (no such anchor)")
    assert not broken, "\n".join(broken[:20])
