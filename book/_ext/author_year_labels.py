"""Author-year labels for the references ("Bishop, 2006", "Sabour et al., 2017").

Citations in the text show an entry's label (``bibtex_reference_style: label``) and the list of
references shows the same label, so "[Sabour et al., 2017]" in a chapter is found under the same
words in the list. Two entries with the same authors and year get "2018a" and "2018b".
Registered as the pybtex formatting style ``author_year_labels`` (``bibtex_default_style``).
"""
from collections import Counter

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle


def _surname(person) -> str:
    return str(Text.from_latex(" ".join(person.prelast_names + person.last_names)))


class AuthorYearLabelStyle(BaseLabelStyle):
    """One author: "Bishop, 2006"; two: "Do and Batzoglou, 2008"; more: "Sabour et al., 2017"."""

    def format_labels(self, sorted_entries):
        labels = [self.format_label(entry) for entry in sorted_entries]
        repeated = {label for label, count in Counter(labels).items() if count > 1}
        seen = Counter()
        for label in labels:
            if label in repeated:
                suffix = "abcdefghijklmnopqrstuvwxyz"[seen[label]]
                seen[label] += 1
                label += suffix
            yield label

    def format_label(self, entry) -> str:
        people = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_surname(person) for person in people]
        if len(names) > 2:
            who = f"{names[0]} et al."
        else:
            who = " and ".join(names) or entry.fields.get("title", entry.key)
        return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearStyle(UnsrtStyle):
    default_label_style = AuthorYearLabelStyle
    default_sorting_style = "author_year_title"


def setup(app):
    register_plugin("pybtex.style.formatting", "author_year_labels", AuthorYearStyle)
    return {"parallel_read_safe": True}
