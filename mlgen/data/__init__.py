"""Data pipelines (grain): text for language models, and tokenizers.

``sources`` (which documents, the split), ``packing`` (documents -> LM batches),
``tokenizer``, ``text`` (the assembled text pipeline), ``images``, and ``pipeline`` (the
split -> host shard -> batch steps text and images share). Images are imported from
``mlgen.data.images``.
"""

from mlgen.data.text import (
    Document,
    LMBatchIterator,
    TextDataConfig,
    get_tokenizer,
    list_documents,
    make_lm_data,
    read_document,
    split_documents,
)
from mlgen.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer, tokenizer_main

__all__ = [
    "ByteTokenizer",
    "Document",
    "LMBatchIterator",
    "SentencePieceTokenizer",
    "TextDataConfig",
    "Tokenizer",
    "get_tokenizer",
    "list_documents",
    "make_lm_data",
    "read_document",
    "split_documents",
    "tokenizer_main",
]
