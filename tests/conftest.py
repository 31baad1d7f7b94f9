"""Test isolation for process-wide state of the package."""

import pytest


@pytest.fixture(autouse=True)
def _fresh_probe_history():
    """``decompose`` remembers which stack shapes were dense (it then skips the
    range finder's probe); each test starts without that memory."""
    from mergekit_drm import decompose

    decompose.reset_probe_history()
    yield
