"""A distill stage's `teacher:` — an earlier stage of the recipe, or a model folder with the student's tokenizer.

On-policy distillation (TRL's DistillationTrainer) scores the student's own samples with the teacher's next-token
distribution, position by position over one vocabulary: a teacher with another tokenizer would compare unrelated
token ids and train on noise without any error. So it is checked when the recipe loads, from the tokenizer files alone
(this is the config layer: no transformers), and again with both tokenizers loaded when the stage starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

# Files that define a tokenizer's vocabulary, in the order they are consulted; the first both folders have decides.
VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def vocabulary_digest(folder: Path) -> dict[str, str]:
    """{file: digest of the vocabulary it defines} for the vocabulary files the folder has. From tokenizer.json only
    the vocabulary and the added tokens count (not the normaliser or the chat template, which may differ harmlessly)."""
    out = {}
    for name in VOCAB_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        if name == "tokenizer.json":
            try:
                tok = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            data = json.dumps([tok.get("model", {}).get("vocab"),
                               sorted((t.get("id"), t.get("content")) for t in tok.get("added_tokens", []))],
                              sort_keys=True).encode()
        else:
            data = path.read_bytes()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def tokenizer_mismatch(teacher: Path, student: Path) -> str | None:
    """Why the two folders' tokenizers differ, or None when they agree or the files cannot tell."""
    a, b = vocabulary_digest(teacher), vocabulary_digest(student)
    for name in VOCAB_FILES:
        if name in a and name in b:
            return None if a[name] == b[name] else f"its {name} defines another vocabulary than the student's"
    return None


def teacher_problem(teacher: str, earlier: list[str], later: list[str], student_source: str) -> str | None:
    """The recipe problem with a distill stage's teacher, or None. `earlier`/`later`: the policy stages before and
    after it; `student_source`: the recipe's model.source (compared when it is a local folder)."""
    if teacher in earlier:
        return None  # an earlier stage of the same recipe trained from the same model: the same tokenizer
    if teacher in later:
        return (f"stage '{teacher}' runs after this one; move it earlier or name one of the stages before this "
                f"one ({earlier or 'none'}) or a model folder")
    folder = Path(teacher).expanduser()
    if not (folder / "config.json").is_file():
        return (f"'{teacher}' is neither a stage before this one ({earlier or 'none'}) nor a model folder (no "
                f"config.json there)")
    student = Path(student_source).expanduser()
    if (student / "config.json").is_file():
        why = tokenizer_mismatch(folder, student)
        if why:
            return (f"the teacher at {teacher} has another tokenizer than model.source ({why}); distillation "
                    f"needs one vocabulary: pick a teacher of the same model family, or distil through data "
                    f"instead (a teacher source in data.datasets, then an sft stage)")
    return None
