"""Text sources -> tokenizer -> cached token arrays -> seeded, resumable batches."""

from jaxformer.data.batches import doc_lengths
from jaxformer.data.batches import entropy_floor
from jaxformer.data.batches import num_scored_docs
from jaxformer.data.batches import train_batch
from jaxformer.data.batches import valid_batches
from jaxformer.data.pipeline import Data
from jaxformer.data.pipeline import load_data
from jaxformer.data.pipeline import validation_set
from jaxformer.data.pipeline import ValidSet
from jaxformer.data.sources import DataError
from jaxformer.data.sources import describe_source
from jaxformer.data.sources import load_source
from jaxformer.data.sources import Source

__all__ = [
    "Data", "DataError", "Source", "ValidSet", "describe_source", "doc_lengths", "entropy_floor",
    "load_data", "load_source", "num_scored_docs", "train_batch", "valid_batches", "validation_set",
]
