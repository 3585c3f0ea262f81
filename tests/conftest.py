"""Shared fixtures: a small generated phantom dataset and its preprocessing cache (built once)."""

import pytest

from .triton_support import bf16_dots_in_interpreter  # noqa: F401  (a fixture: registered by import)


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory):
    """A Decathlon-layout phantom dataset: 10 labeled + 6 unlabeled volumes of 40x56x48."""
    from maeformer_fast.data import make_phantoms

    root = tmp_path_factory.mktemp("phantoms")
    return make_phantoms(root / "Phantoms", num_labeled=10, num_unlabeled=6, shape=(40, 56, 48), seed=0)


@pytest.fixture(scope="session")
def phantom_cache(phantom_dataset, tmp_path_factory):
    from maeformer_fast.data import ensure_preprocessed

    return ensure_preprocessed(phantom_dataset, tmp_path_factory.mktemp("cache") / "cache")
