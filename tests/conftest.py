import os
import tempfile
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


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): from now on nothing can be written below `folder`, as far as the
    scripts' up-front checks (a temporary file made there) can tell. The tests run as
    root, whom file modes do not stop."""
    roots, make = [], tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):
        if dir is not None and any(Path(dir).resolve().is_relative_to(root) for root in roots):
            raise PermissionError(13, "Permission denied")
        return make(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    return lambda folder: roots.append(Path(folder).resolve())
