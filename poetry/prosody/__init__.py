"""Classical prosody (格律): each character's tone and 平水韵 rhyme groups, poem forms, and a rule-based checker."""
from .check import PoemCheck, Violation, check_poem
from .forms import FORMS, Form, Line, Pattern, form_named, infer_form, poem_form, poem_lines, record_form, writing_title
from .tables import LEVEL, OBLIQUE, RhymeGroup, RhymeTable, rhyme_table

__all__ = ["FORMS", "LEVEL", "OBLIQUE", "Form", "Line", "Pattern", "PoemCheck", "RhymeGroup", "RhymeTable",
           "Violation", "check_poem", "form_named", "infer_form", "poem_form", "poem_lines", "record_form",
           "rhyme_table", "writing_title"]
