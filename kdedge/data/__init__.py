"""Datasets: image folders, IDX/NPZ/NPY arrays, built-in datasets and the dataset spec."""

from kdedge.data.folders import FolderDataset, ImageTransform, load_folder
from kdedge.data.idx import parse_idx, read_idx, write_idx
from kdedge.data.sources import (
    BUILTIN_DATASETS,
    cache_dir,
    find_builtin,
    hold_out,
    load_data_for,
    load_dataset,
    load_idx_dir,
    load_npy_dir,
    load_npz,
    locate_dataset,
)
from kdedge.data.spec import ArrayDataset, DatasetSpec, DataSplits, ImageDataset, stratified_rows

__all__ = [
    "ArrayDataset",
    "BUILTIN_DATASETS",
    "DataSplits",
    "DatasetSpec",
    "FolderDataset",
    "ImageDataset",
    "ImageTransform",
    "cache_dir",
    "find_builtin",
    "hold_out",
    "load_data_for",
    "load_dataset",
    "load_folder",
    "load_idx_dir",
    "load_npy_dir",
    "load_npz",
    "locate_dataset",
    "parse_idx",
    "read_idx",
    "stratified_rows",
    "write_idx",
]
