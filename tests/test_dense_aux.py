import pytest
import torch
import torch.nn.functional as F
from transformers import YolosForObjectDetection

from bavit_core.detection.yolos import tiny_yolos_config
from bavit_core.finetune.dense_aux import dense_aux_loss, patch_targets


def box(x0, y0, x1, y1):
    return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]


def test_patch_targets_pick_the_smallest_box_holding_each_patch_centre():
    # grid 2 x 4: patch centres x = 1/8, 3/8, 5/8, 7/8 and y = 1/4, 3/4
    t = [{"class_labels": torch.tensor([2, 4]),
          "boxes": torch.tensor([box(0.0, 0.0, 0.5, 1.0), box(0.3, 0.5, 0.45, 1.0)])},
         {"class_labels": torch.tensor([], dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    labels, boxes = patch_targets(t, (2, 4), no_object=9)
    assert labels.tolist() == [[2, 2, 9, 9, 2, 4, 9, 9], [9] * 8]
    assert torch.equal(boxes[0, 5], t[0]["boxes"][1]) and torch.equal(boxes[0, 0], t[0]["boxes"][0])
    assert boxes[0, 2].abs().sum() == 0 and boxes[1].abs().sum() == 0
    # a box edge is inclusive at its start and exclusive at its end
    edge = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([box(0.125, 0.25, 0.375, 0.75)])}]
    assert patch_targets(edge, (2, 4), 0)[0].tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]]


def test_dense_aux_loss_is_ce_on_kept_tokens_plus_l1_on_fg_tokens():
    torch.manual_seed(0)
    m = YolosForObjectDetection(tiny_yolos_config("nano", num_labels=5, image_size=(32, 64)))
    hidden = torch.randn(1, 1 + 8 + 10, 64, requires_grad=True)
    t = [{"class_labels": torch.tensor([3]), "boxes": torch.tensor([box(0.0, 0.0, 0.5, 0.5)])}]
    keep = torch.tensor([[[True, False, True, True], [True, True, True, False]]])
    got = dense_aux_loss(m, hidden, t, (2, 4), keep, l1_weight=5.0)
    h = hidden[0, 1:9]
    labels = torch.tensor([3, 3, 5, 5, 5, 5, 5, 5])
    k = keep.reshape(-1)
    ce = F.cross_entropy(m.class_labels_classifier(h[k]), labels[k])
    l1 = (m.bbox_predictor(h[0:1]).sigmoid() - t[0]["boxes"]).abs().sum()  # patch 1 is FG but pruned
    torch.testing.assert_close(got, ce + 5.0 * l1)
    got.backward()
    assert hidden.grad[0, 2].abs().sum() == 0 and hidden.grad[0, 1].abs().sum() > 0
    assert hidden.grad[0, 9:].abs().sum() == 0  # detection tokens get nothing from this term


def test_dense_aux_option_is_validated():
    from bavit_core.finetune.loop import FinetuneOptions
    from bavit_core.runtime.errors import OptionError

    with pytest.raises(OptionError, match="--dense-aux must be >= 0"):
        FinetuneOptions(from_scratch=True, dense_aux=-1).validate()
