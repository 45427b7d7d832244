"""Per-row cleaning and filters, as datatrove pipeline steps (so LocalPipelineExecutor can run them in parallel and
Slurm/Ray executors can scale them out).

Each `Document` carries the canonical row in `metadata["row"]` and, in `text`, every turn's content joined (what the
text heuristics look at). Filters are datatrove `BaseFilter`s: a dropped row goes to that step's `exclusion_writer`
(our quarantine) with its reason. Gopher heuristics are datatrove's own; what is written here is what datatrove does not
have: cleaning that sees every turn of a chat row, PII redaction (`llmstack.pii`), token length under the recipe's chat
template, language id with py3langid (datatrove's LanguageFilter downloads a fastText model), and a blocklist.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from pathlib import Path

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.word_tokenizers import WordTokenizer

from llmstack.data.formats import flat_text, map_strings
from llmstack.data.thinking import traces
from llmstack.pii import card_ok, luhn_ok, redact_pii  # noqa: F401 (re-exported)

# ---------------------------------------------------------------- PII
# One detector for curation and the API guard: llmstack.pii (emails, phones, public IPs, Luhn-checked cards, SSNs, API
# keys and key=value secrets, replaced by <KIND> placeholders; RE2, linear time). `redact_pii`, `luhn_ok` and `card_ok`
# are imported above, so callers of this module keep finding them here.


def clean_text(text: str, fix_unicode: bool, pii: bool, counts: Counter) -> str:
    if fix_unicode:
        import ftfy

        # Repair mojibake and control characters, but keep curly quotes and full-width CJK punctuation: they are
        # correct text, and changing them would teach the model a different style than the source's.
        fixed = unicodedata.normalize("NFC", ftfy.fix_text(text, normalization="NFC", uncurl_quotes=False,
                                                            fix_character_width=False))
        if fixed != text:
            counts["unicode_fixed"] += 1
        text = fixed
    if pii:
        text = redact_pii(text, counts)
    return text


class CleanRows(PipelineStep):
    """ftfy + NFC + PII redaction on every content string of the row (not just `text`), then re-render `text`."""

    type = "✂️ - FORMAT"
    name = "clean + PII"

    def __init__(self, fix_unicode: bool = True, pii: bool = True):
        super().__init__()
        self.fix_unicode, self.pii = fix_unicode, pii

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for doc in data:
            counts: Counter = Counter()
            row = map_strings(doc.metadata["row"],
                              lambda s, counts=counts: clean_text(s, self.fix_unicode, self.pii, counts))
            doc.metadata["row"] = row
            doc.text = flat_text(row)
            for k, v in counts.items():
                self.stat_update(k, value=v)
            if counts:
                doc.metadata["cleaned"] = dict(counts)
            yield doc


# ---------------------------------------------------------------- filters


class RegexWordTokenizer(WordTokenizer):
    """Words and sentences by regex. datatrove's English tokenizer needs spaCy (a large extra dependency); for the
    Gopher heuristics' word counts and ratios a regex split gives the same decisions on English prose."""

    _words = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
    _sents = re.compile(r"[^.!?\n]+(?:[.!?]+|$)|\n")

    def word_tokenize(self, text: str) -> list[str]:
        return self._words.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in self._sents.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in self._sents.finditer(text) if m.group().strip()]


WORDS = RegexWordTokenizer("en")


class NonEmptyFilter(BaseFilter):
    name = "non-empty"

    def filter(self, doc: Document):
        if not doc.text.strip():
            return False, "empty: no text"
        row = doc.metadata["row"]
        answers = (row.get("messages", [])[-1:] + row.get("chosen", []) + row.get("rejected", [])
                   + row.get("completion", []))
        if any(not m["content"].strip() and not m.get("tool_calls") for m in answers):  # a call is an answer
            return False, "empty: an assistant answer is blank"
        return True


class MaxCharsFilter(BaseFilter):
    name = "max chars"

    def __init__(self, max_chars: int, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.max_chars = max_chars

    def filter(self, doc: Document):
        if len(doc.text) > self.max_chars:
            return False, f"too large: more than max_chars {self.max_chars}"
        return True


class ThinkingLengthFilter(BaseFilter):
    """Caps the thinking a row carries (its assistant traces together, in characters: counted before tokenizing, and
    the same whichever tokenizer the recipe trains with)."""

    name = "thinking length"

    def __init__(self, max_chars: int, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.max_chars = max_chars

    def filter(self, doc: Document):
        n = sum(len(t) for t in traces(doc.metadata["row"]))
        if n > self.max_chars:
            doc.metadata["thinking_chars"] = n
            return False, f"thinking too long: more than max_thinking_chars {self.max_chars}"
        return True


# tokenizer classes whose transformers tokenizer runs tokenizer.json as it is, adding nothing to plain-text encoding
PLAIN_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast", "GPT2Tokenizer", "GPT2TokenizerFast",
                           "Qwen2Tokenizer", "Qwen2TokenizerFast"}

# transformers' generic tokenizers backend (PreTrainedTokenizerFast is its other name), what transformers 5 saves for
# most models: AutoTokenizer resolves these names to that class itself
GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def _tokenizer_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None


@lru_cache(maxsize=2)
def load_tokenizer(path: str):
    """The recipe's transformers tokenizer (for chat templates; every dataset of a recipe uses the same one). Where
    tokenizer_config.json names the generic backend, that class is loaded directly: the same tokenizer AutoTokenizer
    builds (tests/test_data_fastpaths.py compares them), without importing AutoTokenizer, which brings transformers'
    auto-model machinery (generation, and scikit-learn through it): seconds in every process that only tokenizes
    (`llmstack curate`, each Ray or Slurm curation task)."""
    import transformers

    if _tokenizer_class(Path(path)) in GENERIC_TOKENIZER_CLASSES:
        return transformers.TokenizersBackend.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)


@lru_cache(maxsize=2)
def load_text_encoder(path: str):
    """The `tokenizers` pipeline from a local folder's tokenizer.json, or None where transformers must do the work.

    Written by hand because measuring plain text needs no more than this, and transformers costs each worker ~6.5 s
    and ~540 MB here just to import (it brings torch). Used only where transformers would run the very same
    tokenizer.json (tests/test_data_fastpaths.py compares the counts); chat rows still go through transformers for
    the chat template.
    """
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file() or _tokenizer_class(folder) not in PLAIN_TOKENIZER_CLASSES:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def count_tokens(tokenizer_path: str, texts: list[str]) -> list[int]:
    """Tokens of each plain text under the recipe's tokenizer (no special tokens, no chat template)."""
    encoder = load_text_encoder(tokenizer_path)
    if encoder is not None:  # encode_batch_fast (tokenizers >= 0.20) skips the offsets: the same ids, ~20% faster
        encode = getattr(encoder, "encode_batch_fast", encoder.encode_batch)
        return [len(e.ids) for e in encode(texts, add_special_tokens=False)]
    return [len(ids) for ids in load_tokenizer(tokenizer_path)(texts, add_special_tokens=False)["input_ids"]]


class TokenLengthFilter(BaseFilter):
    """Token count under the recipe's tokenizer and chat template (what the trainer will actually see)."""

    name = "token length"

    def __init__(self, tokenizer_path: str, min_tokens: int, max_tokens: int | None, exclusion_writer=None):
        super().__init__(exclusion_writer, batch_size=64)
        self.tokenizer_path, self.min_tokens, self.max_tokens = tokenizer_path, min_tokens, max_tokens
        self._tok = None

    @property
    def tok(self):
        if self._tok is None:  # loaded in the worker, not pickled with the step
            self._tok = load_tokenizer(self.tokenizer_path)
        return self._tok

    def _rendered(self, row: dict) -> list[str]:
        if "text" in row:
            return [row["text"]]
        tmpl = self.tok.chat_template is not None
        if "messages" in row:
            convs = [row["messages"]]
        elif "completion" in row:
            convs = [row["prompt"] + row["completion"]]
        else:
            convs = [row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]]
        if not tmpl:
            return ["\n".join(m["content"] for m in c) for c in convs]
        if "tools" in row:  # as training renders it: tool specs in the system turn, calls in the Hermes format
            from llmstack.tools import template_for

            return [self.tok.apply_chat_template(c, tools=row["tools"] or None, tokenize=False,
                                                 chat_template=template_for(self.tok)) for c in convs]
        return [self.tok.apply_chat_template(c, tokenize=False) for c in convs]

    def preload(self, chat_rows: bool) -> None:
        """Load in this process what filter_batch will use, into the module caches that forked workers inherit (not
        into the step, which is pickled): transformers only for a chat template or where tokenizers cannot count."""
        if chat_rows or load_text_encoder(self.tokenizer_path) is None:
            load_tokenizer(self.tokenizer_path)

    def _lengths(self, texts: list[str]) -> list[int]:
        return count_tokens(self.tokenizer_path, texts)

    def filter_batch(self, batch: list[Document]):
        texts, owners = [], []
        for i, doc in enumerate(batch):
            for t in self._rendered(doc.metadata["row"]):
                texts.append(t)
                owners.append(i)
        lengths = [0] * len(batch)
        for owner, n in zip(owners, self._lengths(texts) if texts else []):
            lengths[owner] = max(lengths[owner], n)
        out = []
        for doc, n in zip(batch, lengths):
            doc.metadata["n_tokens"] = n
            if n < self.min_tokens:
                out.append((False, f"too short: under min_tokens {self.min_tokens}"))
            elif self.max_tokens is not None and n > self.max_tokens:
                out.append((False, f"too long: over max_tokens {self.max_tokens}"))
            else:
                out.append(True)
        return out

    def filter(self, doc: Document):
        return self.filter_batch([doc])[0]


def langid_model():
    """py3langid's model with its byte walk compiled (llmstack/data/langid.py): the same answers, ~5x faster."""
    from llmstack.data.langid import langid_model as compiled

    return compiled()


class LangIdFilter(BaseFilter):
    """py3langid (offline; its byte walk compiled). Texts under `min_chars` are kept unjudged: langid guesses
    wildly on 'hi'."""

    name = "language"

    def __init__(self, languages: list[str], min_chars: int, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.languages, self.min_chars = set(languages), min_chars

    def filter(self, doc: Document):
        if len(doc.text) < self.min_chars:
            return True
        lang, prob = langid_model().classify(doc.text[:5000])
        doc.metadata["lang"] = lang
        if lang not in self.languages:
            return False, f"language: {lang} not in {sorted(self.languages)}"
        return True


class BlocklistFilter(BaseFilter):
    name = "blocklist"

    def __init__(self, words: list[str], exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)

    def filter(self, doc: Document):
        m = self.pattern.search(doc.text)
        if m:
            return False, f"blocklist: contains '{m.group(1).lower()}'"
        return True
