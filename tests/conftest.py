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


def shared_data(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.is_dir():
        pytest.skip(f"{p} is not present (real-data checks skip on machines without ../shared/data)")
    return p
