"""Data pipelines (grain): text for language models, and tokenizers."""

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
