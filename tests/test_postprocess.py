import numpy as np
import pytest

from bavit_core.bavit.postprocess import neighbour_sum, refine, refine_with_history
from bavit_core.runtime.errors import OptionError


def loop_refine(g, steps, kernel, min_fg):
    g = g.copy()
    offs = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    if kernel == "4":
        offs = [o for o in offs if 0 in o]
    h, w = g.shape
    for _ in range(steps):
        new = g.copy()
        for y in range(h):
            for x in range(w):
                s = sum(g[y + dy, x + dx] for dy, dx in offs if 0 <= y + dy < h and 0 <= x + dx < w)
                if not g[y, x] and s > min_fg:
                    new[y, x] = True
        g = new
    return g


@pytest.mark.parametrize("kernel,min_fg", [("8", 2), ("8", 4), ("4", 1)])
def test_refine_matches_a_loop(kernel, min_fg):
    rng = np.random.default_rng(0)
    grids = rng.random((20, 9, 11)) < 0.3
    got = refine(grids, steps=3, kernel=kernel, min_fg=min_fg)
    for k in range(20):
        assert np.array_equal(got[k], loop_refine(grids[k], 3, kernel, min_fg))


def test_only_bg_turns_fg_and_zero_steps_is_identity():
    rng = np.random.default_rng(1)
    g = rng.random((5, 24, 24)) < 0.4
    assert np.array_equal(refine(g, 0), g)
    assert (refine(g, 3) >= g).all()
    # a hole in a solid block closes in one step; an isolated FG token changes nothing
    block = np.zeros((7, 7), bool)
    block[1:6, 1:6] = True
    block[3, 3] = False
    assert refine(block, 1)[3, 3]
    lone = np.zeros((1, 5, 5), bool)
    lone[0, 2, 2] = True
    assert np.array_equal(refine(lone, 3), lone)
    assert neighbour_sum(block[None])[0, 3, 3] == 8


def test_history_reports_before_and_after():
    gt = np.zeros((1, 6, 6), bool)
    gt[0, 1:5, 1:5] = True
    pred = gt.copy()
    pred[0, 2, 2] = False
    _, h = refine_with_history(pred, gt, steps=1)
    assert h[0]["fg_recall"] == pytest.approx(15 / 16) and h[1]["fg_recall"] == 1.0
    assert h[1]["sparsity"] < h[0]["sparsity"] and h[1]["bg_kept"] < h[0]["bg_kept"] == 1.0


def test_bad_options():
    with pytest.raises(OptionError, match="unknown --kernel '6'"):
        neighbour_sum(np.zeros((1, 3, 3), bool), "6")
    with pytest.raises(OptionError, match="--min-fg must be in"):
        refine(np.zeros((1, 3, 3), bool), 1, "4", 4)
