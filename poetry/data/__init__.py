"""The data layer: typed records, validated loading, training questions built from poems, the split."""
from .errors import DataError, Issue, Loaded
from .io import (
    check_submission,
    load_answers,
    load_poems,
    load_questions,
    load_references,
    load_verses,
    load_writing_requests,
    parse_questions,
    write_submission,
)
from .questions import QuestionBuilder, align_sentences, clauses, split_poems, validation_examples
from .records import OPTION_LETTERS, Answer, Example, Poem, Question, Verse

__all__ = [
    "OPTION_LETTERS", "Answer", "DataError", "Example", "Issue", "Loaded", "Poem", "Question", "QuestionBuilder",
    "Verse", "align_sentences", "check_submission", "clauses", "load_answers", "load_poems", "load_questions",
    "load_references", "load_verses", "load_writing_requests", "parse_questions", "split_poems", "validation_examples",
    "write_submission",
]
