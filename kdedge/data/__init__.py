"""Datasets: IDX and NPZ readers, built-in datasets and the dataset spec."""

from kdedge.data.idx import parse_idx, read_idx, write_idx
from kdedge.data.sources import BUILTIN_DATASETS, cache_dir, find_builtin, load_dataset, load_idx_dir, load_npz, locate_dataset
from kdedge.data.spec import ArrayDataset, DatasetSpec, DataSplits

__all__ = [
    "ArrayDataset",
    "BUILTIN_DATASETS",
    "DataSplits",
    "DatasetSpec",
    "cache_dir",
    "load_dataset",
    "load_idx_dir",
    "load_npz",
    "locate_dataset",
    "find_builtin",
    "parse_idx",
    "read_idx",
    "write_idx",
]
