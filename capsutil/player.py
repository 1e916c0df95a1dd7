"""Kernel-free figures: a matplotlib figure redrawn for each of a few frames, played in the page.

The book is read as static HTML, where no kernel answers an ipywidgets slider. Where the
browser only has to *show* precomputed results (an EM iteration, a routing iteration, a
perturbation), :func:`frame_player` draws every frame in Python and hands them to matplotlib's
own JavaScript player (``Animation.to_jshtml``): a slider and step buttons that work offline,
in Jupyter and in the built book alike. Nothing here computes in the browser.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import matplotlib.pyplot as plt
from matplotlib.animation import FuncAnimation
from matplotlib.figure import Figure

DPI = 80                          # frames are PNGs embedded in the page: keep them light
MAX_PLAYER_BYTES = 6 * 2**20      # what one player may add to a page
# matplotlib's player draws its buttons with Font Awesome 4 icons from a CDN, which a reader
# offline never gets: the link is dropped and each icon becomes a character.
ICON_LINK = re.compile(r'<link rel="stylesheet"[^>]*font-awesome[^>]*>\s*')
ICONS = {"fa fa-minus": "&minus;", "fa fa-fast-backward": "&laquo;",
         "fa fa-step-backward": "&lsaquo;", "fa fa-play fa-flip-horizontal": "&#x25C0;",
         "fa fa-pause": "||", "fa fa-play": "&#x25B6;", "fa fa-step-forward": "&rsaquo;",
         "fa fa-fast-forward": "&raquo;", "fa fa-plus": "+"}
# The frames fit the column on a phone; the slider follows the column's width.
STYLE = ("<style>.capsutil-player img{max-width:100%;height:auto}"
         ".capsutil-player input[type=range].anim-slider{width:90%;max-width:374px}</style>")


class PlayerHTML:
    """The player's HTML, shown by Jupyter (``_repr_html_``) and stored as a text/html output."""

    def __init__(self, html: str):
        self.html = html

    def _repr_html_(self) -> str:
        return self.html

    def __len__(self) -> int:
        return len(self.html.encode("utf-8"))


def frame_player(fig: Figure, draw: Callable[[int], None], n_frames: int, *,
                 interval_ms: int = 600, dpi: int = DPI) -> PlayerHTML:
    """Draw frame ``k`` with ``draw(k)`` on ``fig`` for k = 0, ..., n_frames - 1 and return a
    player with a slider over the frames. The figure is closed (not shown twice).

    ``draw`` updates the figure's axes in place (clear and redraw, or set new data).
    """
    if isinstance(n_frames, bool) or not isinstance(n_frames, int) or n_frames < 1:
        raise ValueError(f"expected a positive number of frames, got {n_frames!r}")
    fig.set_dpi(dpi)
    animation = FuncAnimation(fig, lambda k: draw(k), frames=n_frames, interval=interval_ms,
                              repeat=False)
    html = animation.to_jshtml(default_mode="once", embed_frames=True)
    plt.close(fig)
    player = PlayerHTML(f'<div class="capsutil-player">{STYLE}{offline(html)}</div>')
    if len(player) > MAX_PLAYER_BYTES:
        raise ValueError(f"the player is {len(player):,} bytes, over the "
                         f"{MAX_PLAYER_BYTES:,} a page may carry: use fewer frames, a smaller "
                         f"figure or a lower dpi")
    return player


def offline(html: str) -> str:
    """matplotlib's player HTML with no request outside the page: the icon font's link goes,
    and every icon becomes a plain character."""
    html = ICON_LINK.sub("", html)
    for icon, character in ICONS.items():
        html = html.replace(f'<i class="{icon}"></i>', character)
    if "font-awesome" in html or '<i class="fa' in html:
        raise ValueError("matplotlib's player markup changed: an icon or its font is left")
    return html
