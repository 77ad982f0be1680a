"""Labelled data for training task memories: named offline datasets, user files, GLUE folders.

Everything loads into one shape, `TaskData` (types.py): train/dev/test lists of `Example` plus the
ordered class names. Splits that a source does not provide are cut from its training data with a
fixed, seeded (and, for classification, stratified) split (sampling.py), so a given seed always
yields the same split. readers.py reads CSV/TSV/JSONL; files.py, glue.py and named.py are the
three sources. This module only re-exports their public names.
"""

from app.training.datasets.files import class_namer, infer_task_type, load_files, load_test_file
from app.training.datasets.glue import load_glue
from app.training.datasets.named import NAMED, NamedDataset, load_named, strip_newsgroup_header
from app.training.datasets.sampling import few_shot, split_examples
from app.training.datasets.types import (
    TASK_TYPES,
    Example,
    FileRead,
    TaskData,
    label_difference,
    name_some,
    ordered_labels,
)

__all__ = [
    "NAMED",
    "TASK_TYPES",
    "Example",
    "FileRead",
    "NamedDataset",
    "TaskData",
    "class_namer",
    "few_shot",
    "infer_task_type",
    "label_difference",
    "load_files",
    "load_glue",
    "load_named",
    "load_test_file",
    "name_some",
    "ordered_labels",
    "split_examples",
    "strip_newsgroup_header",
]
