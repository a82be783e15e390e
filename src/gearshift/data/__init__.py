"""Corpora, tokenizers, packing, chat profiles and synthetic tasks for the built-in tasks."""

from gearshift.data.corpus import Corpus, load_corpus, pydoc_topics
from gearshift.data.packing import PackedData, PackedSequences, pack_documents
from gearshift.data.profiles import BUILTIN_PROFILES, Profile, apply_policy, load_profile
from gearshift.data.synthetic import SYNTHETIC_TASKS, Example, make_examples, score
from gearshift.data.tokenizer import byte_level_tokenizer, load_tokenizer

__all__ = [
    "BUILTIN_PROFILES",
    "SYNTHETIC_TASKS",
    "Corpus",
    "Example",
    "PackedData",
    "PackedSequences",
    "Profile",
    "apply_policy",
    "byte_level_tokenizer",
    "load_corpus",
    "load_profile",
    "load_tokenizer",
    "make_examples",
    "pack_documents",
    "pydoc_topics",
    "score",
]
