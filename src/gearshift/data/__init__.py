"""Corpora, tokenizers and packing for the built-in tasks."""

from gearshift.data.corpus import Corpus, load_corpus, pydoc_topics
from gearshift.data.packing import PackedData, PackedSequences, pack_documents
from gearshift.data.tokenizer import byte_level_tokenizer, load_tokenizer

__all__ = [
    "Corpus",
    "PackedData",
    "PackedSequences",
    "byte_level_tokenizer",
    "load_corpus",
    "load_tokenizer",
    "pack_documents",
    "pydoc_topics",
]
