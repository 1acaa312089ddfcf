"""Normalised, validated records and the errors that name where a bad one came from.

A *text* is either a string or a list of chat messages ``{"role": str, "content": str}``.
Three record types cover every family:

* ``PreferenceRecord``: a prompt, a chosen and a rejected completion. DOVE joint pairs give
  the rejected side its own prompt (``rejected_prompt``); otherwise both share ``prompt``.
* ``SFTRecord``: a prompt and one completion.
* ``PromptRecord``: a prompt alone (the online loop samples completions for it).

Every record carries ``index`` (its position among the dataset's good records: the
``example_index`` of the batch contract) and its ``file`` and ``line`` for error messages.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Union

__all__ = [
    "BadRecord",
    "DataError",
    "DataReport",
    "FieldError",
    "Message",
    "OnBad",
    "PreferenceRecord",
    "PromptRecord",
    "Record",
    "SFTRecord",
    "Text",
    "is_conversational",
    "validate_text",
]

Message = dict[str, str]
Text = Union[str, list[Message]]

ROLES = ("system", "user", "assistant", "tool")
OnBad = Literal["error", "skip"]


@dataclass(frozen=True)
class BadRecord:
    """One problem with one input row: ``file:line: field: problem``."""

    file: str
    line: int
    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.problem}"


class DataError(ValueError):
    """A bad input row; ``.bad`` says where (file, line), which field and what is wrong."""

    def __init__(self, bad: BadRecord):
        super().__init__(str(bad))
        self.bad = bad

    def __reduce__(self) -> tuple[type, tuple[BadRecord]]:  # crosses process boundaries (bulk encoding)
        return DataError, (self.bad,)


class FieldError(ValueError):
    """A problem with one field of one row, before the row's location is attached."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass
class DataReport:
    """What reading and encoding saw: rows, good records per format, bad rows, drops."""

    rows: int = 0
    formats: Counter = field(default_factory=Counter)
    bad: list[BadRecord] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    boundary_merges: int = 0

    @property
    def num_records(self) -> int:
        return sum(self.formats.values())

    def add_bad(self, bad: BadRecord, on_bad_record: OnBad) -> None:
        if on_bad_record == "error":
            raise DataError(bad)
        self.bad.append(bad)

    def merge(self, part: DataReport) -> None:
        """Adds ``part`` (what a later stretch of the same data saw) to this report."""
        self.rows += part.rows
        self.formats.update(part.formats)
        self.bad += part.bad
        self.dropped.update(part.dropped)
        self.boundary_merges += part.boundary_merges

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "formats": dict(self.formats), "bad": [asdict(b) for b in self.bad],
                "dropped": dict(self.dropped), "boundary_merges": self.boundary_merges}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> DataReport:
        return cls(rows=value["rows"], formats=Counter(value["formats"]), bad=[BadRecord(**b) for b in value["bad"]],
                   dropped=Counter(value["dropped"]), boundary_merges=value["boundary_merges"])

    def summary(self, max_bad: int = 5) -> str:
        """A few lines for logs: counts per format, the first bad rows and totals."""
        lines = [f"rows read: {self.rows}"]
        lines += [f"records ({fmt}): {n}" for fmt, n in sorted(self.formats.items())]
        lines.append(f"bad records: {len(self.bad)}")
        lines += [f"  {b}" for b in self.bad[:max_bad]]
        if len(self.bad) > max_bad:
            lines.append(f"  ... and {len(self.bad) - max_bad} more")
        if self.dropped:
            lines += [f"dropped by truncation ({why}): {n}" for why, n in sorted(self.dropped.items())]
        if self.boundary_merges:
            lines.append(f"prompt/completion boundary merges tokenized apart: {self.boundary_merges}")
        return "\n".join(lines)



@dataclass(frozen=True)
class PreferenceRecord:
    """A preference pair; ``rejected_prompt`` is set only for DOVE joint pairs."""

    prompt: Text
    chosen: Text
    rejected: Text
    rejected_prompt: Text | None = None
    format: str = "standard"
    index: int = -1
    file: str = ""
    line: int = 0

    @property
    def is_joint(self) -> bool:
        return self.rejected_prompt is not None

    @property
    def rejected_side_prompt(self) -> Text:
        """The prompt of the rejected completion (its own for DOVE, else the shared one)."""
        return self.prompt if self.rejected_prompt is None else self.rejected_prompt


@dataclass(frozen=True)
class SFTRecord:
    prompt: Text
    completion: Text
    format: str = "sft"
    index: int = -1
    file: str = ""
    line: int = 0


@dataclass(frozen=True)
class PromptRecord:
    prompt: Text
    format: str = "prompt"
    index: int = -1
    file: str = ""
    line: int = 0


Record = Union[PreferenceRecord, SFTRecord, PromptRecord]


def is_conversational(text: Text) -> bool:
    return isinstance(text, list)


def validate_text(field: str, value: Any, *, allow_empty: bool = False) -> Text:
    """Checks a string or message list; returns it with messages as plain ``{role, content}``.

    Raises ``FieldError`` for a wrong type, an unknown role, or (unless ``allow_empty``) a text
    that is empty or only whitespace (an empty completion gives NaN means downstream).
    """
    if isinstance(value, str):
        if not allow_empty and not value.strip():
            raise FieldError(field, "empty")
        return value
    if isinstance(value, list):
        if not value:
            raise FieldError(field, "empty message list")
        out = []
        for i, m in enumerate(value):
            where = f"{field}[{i}]"
            if not isinstance(m, dict):
                raise FieldError(where, f"expected a message object, got {type(m).__name__}")
            if "role" not in m or "content" not in m:
                missing = [k for k in ("role", "content") if k not in m]
                raise FieldError(where, f"missing key(s) {', '.join(missing)}")
            role, content = m["role"], m["content"]
            if role not in ROLES:
                raise FieldError(f"{where}.role", f"unknown role {role!r} (allowed: {', '.join(ROLES)})")
            if not isinstance(content, str):
                raise FieldError(f"{where}.content", f"expected a string, got {type(content).__name__}")
            out.append({"role": role, "content": content})
        if not allow_empty and not any(m["content"].strip() for m in out):
            raise FieldError(field, "empty (every message's content is blank)")
        return out
    raise FieldError(field, f"expected a string or a list of messages, got {type(value).__name__}")
