"""Concepts: caption parsing -> concept pool (:mod:`.extraction`, spaCy) and concept pool files,
with the one pool reader :func:`load_concept_pool` (:mod:`.pool`)."""

from rclip_core.data.concepts.extraction import (ATTRIBUTE_SETS, COLOUR_ATTRIBUTES, COLOUR_NOUNS, DEFAULT_SPACY_MODEL,
                                                 DEFAULT_STOPLIST, NON_OBJECT_NOUNS, PARTITIVE_NOUNS,
                                                 PLURAL_ONLY_NOUNS, SPACY_MODEL_ALIASES, SYMBOL_COMPOUNDS,
                                                 count_concepts, default_known_compounds, doc_concepts,
                                                 extract_concepts, load_spacy_model, select_concepts)
from rclip_core.data.concepts.pool import load_concept_pool, read_concept_pool, write_concept_pool

__all__ = [
    "DEFAULT_SPACY_MODEL", "SPACY_MODEL_ALIASES", "NON_OBJECT_NOUNS", "COLOUR_NOUNS", "DEFAULT_STOPLIST",
    "COLOUR_ATTRIBUTES", "ATTRIBUTE_SETS", "PARTITIVE_NOUNS", "PLURAL_ONLY_NOUNS", "SYMBOL_COMPOUNDS",
    "load_spacy_model", "default_known_compounds", "doc_concepts", "count_concepts", "select_concepts",
    "extract_concepts", "write_concept_pool", "read_concept_pool", "load_concept_pool",
]
