import os
import random
import tempfile
from pathlib import Path

import pytest
import torch

# Real data (the GPT-2 BPE cache, HH-RLHF pairs) lives in ../shared/data beside the
# checkout. Pointing tiktoken at its cache keeps the tests offline; a cache set by the
# caller wins.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED_DATA / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken")


@pytest.fixture(autouse=True)
def seeded_random_state():
    """Each test starts from the same global random state, whichever tests ran before it
    (many seed it themselves), and leaves it as it was."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):  # the CPU's generator (a CUDA test seeds its own)
        torch.default_generator.manual_seed(0)
        random.seed(0)
        yield
    random.setstate(python_state)


@pytest.fixture
def shared_data() -> Path:
    """The shared real-data folder; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): from now on the temporary files that the scripts' write checks
    and atomic checkpoint writes make cannot be made below `folder`, as in a folder that
    cannot be written (the tests run as root, whom file modes do not stop). Other writes
    are not caught: a test that needs to know compares the folder before and after."""
    roots = []

    def refusing(make):
        def made_unless_read_only(*args, dir=None, **kwargs):
            if dir is not None and any(Path(dir).resolve().is_relative_to(root) for root in roots):
                raise PermissionError(13, "Permission denied")
            return make(*args, dir=dir, **kwargs)
        return made_unless_read_only

    monkeypatch.setattr(tempfile, "TemporaryFile", refusing(tempfile.TemporaryFile))
    monkeypatch.setattr(tempfile, "mkstemp", refusing(tempfile.mkstemp))
    return lambda folder: roots.append(Path(folder).resolve())


def listing(folder) -> dict:
    """Every file below `folder`, with its size and modification time: to see that
    nothing was written there."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob("*"))}
