import json
from pathlib import Path

import pytest

from bavit_core.data.synthetic import synth_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def coco_synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco_synth")
    synth_dataset(root, n_images=40, fmt="coco", seed=3, size=(120, 160), val_fraction=0.25)
    return root


@pytest.fixture(scope="session")
def voc_synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc_synth")
    synth_dataset(root, n_images=16, fmt="voc", seed=5, size=(100, 140), val_fraction=0.5)
    return root


# the generated shapes under COCO's own category ids and names, so a COCO-trained
# detector's 91-label table maps them as it maps COCO
COCO_AS = {1: (1, "person"), 2: (3, "car"), 3: (18, "dog"), 4: (44, "bottle"), 5: (62, "chair")}


@pytest.fixture(scope="session")
def coco_named(coco_synth, tmp_path_factory):
    """coco_synth under COCO category ids and names (its images linked, not copied)."""
    root = tmp_path_factory.mktemp("coco_named")
    for split in ("train2017", "val2017"):
        (root / split).symlink_to(coco_synth / split)
        doc = json.loads((coco_synth / "annotations" / f"instances_{split}.json").read_text())
        doc["categories"] = [{"id": COCO_AS[c["id"]][0], "name": COCO_AS[c["id"]][1], "supercategory": "thing"}
                             for c in doc["categories"]]
        for a in doc["annotations"]:
            a["category_id"] = COCO_AS[a["category_id"]][0]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def shared_data(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.is_dir():
        pytest.skip(f"{p} is not present (real-data checks skip on machines without ../shared/data)")
    return p
