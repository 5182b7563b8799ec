"""Data loading and batching for kd_jax."""

from kd_jax.data.tsm import (
    TSM_LABELS,
    TSM_LANGUAGES,
    DataError,
    Example,
    load_tsm,
)
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
