import pytest

from pdserve.engine.shm_segment import free_kv_buffer, owned_segments


@pytest.fixture(autouse=True)
def _free_shm_segments():
    """Every test leaves /dev/shm as it found it."""
    before = set(owned_segments())
    yield
    for name in set(owned_segments()) - before:
        free_kv_buffer(name)
