"""Data: reading and checking NIfTI / Decathlon datasets, the preprocessing cache, loaders, phantoms.

Typical use::

    cache = ensure_preprocessed("path/to/Task04_Hippocampus")   # builds or reuses the cache
    batches = make_loader(cache, (32, 48, 32), batch_size=4, device="cuda")
    batch = next(batches)   # {"image": (B, C, Z, Y, X) float32, "label": (B, Z, Y, X) int64, ...}
"""

from .cache import is_cache, load_geometry, load_plan
from .errors import DatasetError, Problem
from .geometry import restore_to_original
from .io import read_volume, write_nifti
from .layout import scan_layout
from .loaders import DEFAULT_BACKEND, make_loader
from .phantoms import make_phantoms
from .preprocess import default_cache_dir, ensure_preprocessed, preprocess_dataset, preprocess_volume
from .sampling import AugmentConfig

__all__ = [
    "DEFAULT_BACKEND",
    "AugmentConfig",
    "DatasetError",
    "Problem",
    "default_cache_dir",
    "ensure_preprocessed",
    "is_cache",
    "load_geometry",
    "load_plan",
    "make_loader",
    "make_phantoms",
    "preprocess_dataset",
    "preprocess_volume",
    "read_volume",
    "restore_to_original",
    "scan_layout",
    "write_nifti",
]
