from pathlib import Path

import pytest

from tests.dist.harness import run_layout


@pytest.fixture(scope="session")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist-results")


@pytest.fixture(scope="session")
def single_process(results_dir: Path) -> dict:
    """The reference: the base config trained by one process."""
    return run_layout(1, [], results_dir)
