import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from capsutil import player  # noqa: E402


def _player(n_frames: int = 4, **kwargs) -> player.PlayerHTML:
    fig, ax = plt.subplots(figsize=(3, 2))

    def draw(k):
        ax.clear()
        ax.plot([0, 1], [0, k])
    return player.frame_player(fig, draw, n_frames, **kwargs)


def test_player_has_a_slider_over_every_frame_and_needs_no_network():
    html = _player(5).html
    assert re.search(r'type="range" class="anim-slider"', html)
    assert html.count("frames[") >= 5                          # one embedded image per frame
    assert "http" not in html and "font-awesome" not in html and '<i class="fa' not in html
    assert html.startswith('<div class="capsutil-player">') and player.PlayerHTML(html)._repr_html_()


def test_player_refuses_to_grow_past_its_budget(monkeypatch):
    monkeypatch.setattr(player, "MAX_PLAYER_BYTES", 1000)
    with pytest.raises(ValueError, match="over the 1,000 a page may carry"):
        _player(3)


def test_offline_refuses_markup_it_does_not_know():
    with pytest.raises(ValueError, match="an icon or its font is left"):
        player.offline('<button><i class="fa fa-rocket"></i></button>')


@pytest.mark.parametrize("n_frames", [0, -1, 1.5, True])
def test_player_needs_a_positive_number_of_frames(n_frames):
    with pytest.raises(ValueError, match="positive number of frames"):
        _player(n_frames)
