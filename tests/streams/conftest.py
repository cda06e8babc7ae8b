"""Fixtures the websocket and WebRTC tests share: the visible tiny model, one input, its references."""

from __future__ import annotations

import numpy as np
import pytest

from helpers.streams_testing import FOX, WHALE, pattern, reference_output, visible_tiny_bundle
from livediff.models.bundle import ModelBundle


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    return visible_tiny_bundle()


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return pattern(160, 120, seed=1)


@pytest.fixture(scope="module")
def references(bundle: ModelBundle, frame: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "fox": reference_output(bundle, frame, **FOX),
        "whale": reference_output(bundle, frame, **WHALE),
    }
