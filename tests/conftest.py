import os
from pathlib import Path

import pytest

# Real data (the GPT-2 BPE cache, HH-RLHF pairs) lives in ../shared/data beside the
# checkout. Pointing tiktoken at its cache keeps the tests offline; a cache set by the
# caller wins.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED_DATA / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken")


@pytest.fixture
def shared_data() -> Path:
    """The shared real-data folder; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA
