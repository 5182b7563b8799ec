"""Data loading and batching for kd_jax."""

from kd_jax.data.schema import DataError, Example, stratified_subset
from kd_jax.data.tsm import TSM_LABELS, TSM_LANGUAGES, load_tsm
from kd_jax.data.tasks import TaskData, load_task, parse_task
from kd_jax.data.batching import (
    TokenizedData,
    batches,
    bucket_boundaries,
    check_batch_size,
    num_batches,
    padding_efficiency,
    steps_per_epoch,
    tokenize_examples,
    validate_buckets,
)

__all__ = [
    "TSM_LABELS",
    "TSM_LANGUAGES",
    "DataError",
    "Example",
    "load_tsm",
    "stratified_subset",
    "TaskData",
    "load_task",
    "parse_task",
    "TokenizedData",
    "batches",
    "bucket_boundaries",
    "check_batch_size",
    "num_batches",
    "padding_efficiency",
    "steps_per_epoch",
    "tokenize_examples",
    "validate_buckets",
]
