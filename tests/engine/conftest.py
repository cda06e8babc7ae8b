"""Fixtures for the live runtime tests (helpers live in ``runtime_testing``)."""

from __future__ import annotations

import pytest
from runtime_testing import ProbeBundle, probe_from

from livediff.models.bundle import ModelBundle


@pytest.fixture(scope="session")
def probe_bundle(tiny_bundle: ModelBundle) -> ProbeBundle:
    """The tiny preset's text encoder with the probe VAE and UNet (see ``runtime_testing``)."""
    return probe_from(tiny_bundle)
