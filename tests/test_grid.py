import numpy as np
import pytest
from shapely.geometry import box as sbox

from bavit_core.data.grid import (GridSpec, box_cell_scores, cell_pixel_counts, cell_sizes, cell_starts,
                                  image_box_scores, parse_size, resample_grid)
from bavit_core.runtime.errors import OptionError


def shapely_scores(b, w, h, gh, gw, criterion):
    B = sbox(*b)
    out = np.zeros((gh, gw))
    for i in range(gh):
        for j in range(gw):
            P = sbox(j * w / gw, i * h / gh, (j + 1) * w / gw, (i + 1) * h / gh)
            inter = P.intersection(B).area
            out[i, j] = inter / P.area if criterion == "coverage" else inter / P.union(B).area
    return out


@pytest.mark.parametrize("criterion", ["coverage", "jaccard"])
@pytest.mark.parametrize("grid", [(24, 24), (12, 20), (7, 5)])
def test_box_scores_match_shapely(criterion, grid):
    rng = np.random.default_rng(0)
    gh, gw = grid
    for _ in range(12):
        w, h = rng.integers(50, 700, size=2)
        x0, x1 = np.sort(rng.uniform(0, w, 2))
        y0, y1 = np.sort(rng.uniform(0, h, 2))
        b = np.array([[x0, y0, x1, y1]])
        got = box_cell_scores(b, np.array([w]), np.array([h]), grid, criterion)[0]
        ref = shapely_scores((x0, y0, x1, y1), w, h, gh, gw, criterion)
        np.testing.assert_allclose(got, ref, atol=1e-9, rtol=0)


def test_image_scores_take_max_over_boxes_and_keep_empty_images_zero():
    rng = np.random.default_rng(1)
    sizes = np.array([[300, 200], [640, 480], [100, 100]])
    boxes, owner = [], []
    for img in (0, 0, 0, 2, 2):
        w, h = sizes[img]
        x0, x1 = np.sort(rng.uniform(0, w, 2))
        y0, y1 = np.sort(rng.uniform(0, h, 2))
        boxes.append([x0, y0, x1, y1])
        owner.append(img)
    boxes = np.array(boxes)
    owner = np.array(owner)
    got = image_box_scores(boxes[::-1], owner[::-1], sizes[:, 0], sizes[:, 1], (6, 8), "jaccard", chunk=2)
    for img in range(3):
        ref = np.zeros((6, 8))
        for b, o in zip(boxes, owner):
            if o == img:
                ref = np.maximum(ref, shapely_scores(b, *sizes[img], 6, 8, "jaccard"))
        np.testing.assert_allclose(got[img], ref, atol=1e-9)
    assert not got[1].any()


def test_box_interior_is_fg_under_coverage_but_not_under_literal_jaccard():
    # a box covering the whole 384x384 image: every patch is inside it
    cov = box_cell_scores(np.array([[0, 0, 384, 384.0]]), np.array([384]), np.array([384]), (24, 24), "coverage")
    jac = box_cell_scores(np.array([[0, 0, 384, 384.0]]), np.array([384]), np.array([384]), (24, 24), "jaccard")
    assert (cov == 1).all()
    np.testing.assert_allclose(jac, 1 / 576)


def test_cell_starts_assign_each_pixel_by_its_centre():
    for size, cells in [(640, 24), (480, 24), (25, 24), (24, 24), (1000, 7)]:
        starts = cell_starts(size, cells)
        owner = np.searchsorted(starts, np.arange(size), side="right") - 1
        centre_cell = np.floor((np.arange(size) + 0.5) * cells / size).astype(int)
        assert (owner == centre_cell).all()
        assert (np.diff(np.r_[starts, size]) >= 1).all()
    with pytest.raises(OptionError):
        cell_starts(10, 24)


def test_cell_pixel_counts_match_a_loop():
    rng = np.random.default_rng(2)
    m = rng.random((47, 61)) < 0.3
    got = cell_pixel_counts(m, (5, 7))
    ref = np.zeros((5, 7), dtype=int)
    for y in range(47):
        for x in range(61):
            ref[int((y + 0.5) * 5 / 47), int((x + 0.5) * 7 / 61)] += m[y, x]
    assert (got == ref).all()
    assert cell_sizes(47, 61, (5, 7)).sum() == 47 * 61


def test_grid_spec_and_sizes():
    assert GridSpec(384, 384, 16).shape == (24, 24)
    assert GridSpec(384, 512, 32).shape == (12, 16)
    assert parse_size("384x512") == (384, 512)
    assert parse_size("96") == (96, 96)
    with pytest.raises(OptionError, match="not divisible"):
        GridSpec(380, 384, 16)
    with pytest.raises(OptionError, match="cannot read size"):
        parse_size("big")


def test_resample_nearest_keeps_positions_and_identity():
    g = np.zeros((24, 24), dtype=bool)
    g[0, 0] = g[23, 23] = g[12, 5] = True
    up = resample_grid(g, (32, 32))
    assert up.shape == (32, 32)
    assert up[0, 0] and up[31, 31]
    assert abs(up.mean() - g.mean()) < 0.01
    assert (resample_grid(g, (24, 24)) == g).all()
    anyup = resample_grid(g, (32, 32), mode="any")
    assert (anyup >= up).all()
