"""Data for COCONUT training and evaluation: the official JSON format, tokenizers, the stage curriculum,
collation (aligned and ragged), a ProsQA-style generator and exact-match evaluation.

Pure Python + torch; the trainer (`coconut_kernels.train`) and the model layer consume these names.
"""
from .collate import AlignedCollator, RaggedCollator
from .eval import exact_match_accuracy, extract_answer, extract_cot, is_correct, normalize_answer
from .prosqa import concept_nouns, generate_dataset, generate_problem, person_names, reachable
from .records import load_records, save_records, validate_records
from .stages import (
    IGNORE_INDEX,
    METHODS,
    Example,
    StageConfig,
    TokenizedRecord,
    build_example,
    build_prompt,
    tokenize_record,
    tokenize_records,
)
from .tokenizer import END_LATENT, LATENT, START_LATENT, HFTokenizer, Tokenizer, WordTokenizer, load_tokenizer

__all__ = [
    "AlignedCollator",
    "RaggedCollator",
    "exact_match_accuracy",
    "extract_answer",
    "extract_cot",
    "is_correct",
    "normalize_answer",
    "concept_nouns",
    "generate_dataset",
    "generate_problem",
    "person_names",
    "reachable",
    "load_records",
    "save_records",
    "validate_records",
    "IGNORE_INDEX",
    "METHODS",
    "Example",
    "StageConfig",
    "TokenizedRecord",
    "build_example",
    "build_prompt",
    "tokenize_record",
    "tokenize_records",
    "END_LATENT",
    "LATENT",
    "START_LATENT",
    "HFTokenizer",
    "Tokenizer",
    "WordTokenizer",
    "load_tokenizer",
]
