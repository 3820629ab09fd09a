import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("COSTMODEL_SHARED", REPO.parent / "shared"))


def need_shared():
    if not (SHARED / "bench_data").is_dir():
        pytest.skip(f"shared material not found at {SHARED} (set COSTMODEL_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def shared():
    return need_shared()


@pytest.fixture(scope="session")
def h100_infersim(shared):
    from costmodel import get_gpu, load_tables
    return load_tables(shared / "bench_data", get_gpu("H100"))


@pytest.fixture(scope="session")
def h100_repo():
    from costmodel import get_gpu, load_tables
    return load_tables(REPO / "bench_data", get_gpu("H100"))


class Interrupted(Exception):
    """Raised by `sweep_stopped_after` to stop a sweep between chunks."""


def sweep_stopped_after(sw, chunk: int, *args, **kw) -> None:
    """Run ``sw.sweep(*args, **kw)`` and stop it right after chunk ``chunk`` has been written."""
    def stop(k):
        if k == chunk:
            raise Interrupted
    with pytest.raises(Interrupted):
        sw.sweep(*args, on_chunk=stop, **kw)
