"""The curate pass's faster steps decide exactly what the straightforward versions decide: the Gopher filters against
datatrove's own, the decontamination prefilter against hashing every n-gram, the ASCII text normalisation against
datatrove's simplify_text, and the quarantine/pass writer against datatrove's default adapter. Texts are real-looking
prose plus adversarial edits aimed at each Gopher check (repeated spans, glued words, bullets, hashes, ellipses)."""

import hashlib
import json
import random
from collections import Counter

from datatrove.data import Document
from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
from datatrove.utils.text import simplify_text
from hypothesis import given, settings
from hypothesis import strategies as st

from llmstack.data.decontam import NGramIndex
from llmstack.data.dedup import normalised
from llmstack.data.filters import WORDS
from llmstack.data.gopher import GopherQuality, GopherRepetition
from llmstack.data.readers import jsonl_writer

VOCAB = ("the of and to a in that is was he for it with as his on be at by had are but from or have an they which "
         "one you were all we her she there would their will when who him been has more if no out so said what up "
         "its about into than them can only other new some could time these two may then do first any my now such "
         "like our over man me even most made after also did many before must through back years where much your "
         "way well down should because each just those people how too little state good very make world still own "
         "see men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        w = [rng.choice(VOCAB) for _ in range(rng.randint(0, 220))]
        mode = i % 7
        if mode == 1 and len(w) > 20:  # a span repeated a few times
            a, size = rng.randrange(len(w) - 12), rng.randint(2, 12)
            for _ in range(rng.randint(1, 6)):
                p = rng.randrange(len(w))
                w[p:p] = w[a:a + size]
        elif mode == 2:  # glued-word look-alikes: "ab"+"c" and "a"+"bc" are one n-gram for datatrove's dup check
            w = [rng.choice(["ab", "a", "b", "bc", "c", "abc"]) for _ in range(rng.randint(5, 120))] + w[:30]
        elif mode == 3:  # lines with bullets and trailing ellipses
            lines, j = [], 0
            while j < len(w):
                k = rng.randint(1, 12)
                bullet, end = rng.choice(["- ", "• ", "", ""]), rng.choice(["", "...", "…", "."])
                lines.append(bullet + " ".join(w[j:j + k]) + end)
                j += k
            out.append("\n".join(lines))
            continue
        elif mode == 4:  # symbols and numbers
            w = [x if rng.random() > 0.15 else rng.choice(["#", "...", "…", "#tag", "__", "12", "3.5", "é"]) for x in w]
        elif mode == 5 and w:  # duplicated lines and paragraphs
            seg = " ".join(w[: rng.randint(1, 20)])
            out.append((seg + rng.choice(["\n", "\n\n"])) * rng.randint(1, 5) + " ".join(w))
            continue
        out.append(" ".join(w))
    return out


def test_gopher_filters_decide_exactly_like_datatrove():
    pairs = [(GopherRepetitionFilter(language=WORDS), GopherRepetition(language=WORDS)),
             (GopherQualityFilter(language=WORDS), GopherQuality(language=WORDS))]
    seen: Counter = Counter()
    for text in texts(1500):
        doc = Document(text=text, id="x")
        for reference, ours in pairs:
            expected = reference.filter(doc)
            assert ours.filter(doc) == expected, (type(reference).__name__, text[:200])
            seen[expected if expected is True else expected[1]] += 1
    # the texts reach the checks that were rewritten, not just the first ones
    for reason in ("top_2_gram", "top_3_gram", "top_4_gram", "duplicated_5_n_grams", "dup_line_frac",
                   "gopher_short_doc", "gopher_below_alpha_threshold", "gopher_too_many_end_ellipsis"):
        assert seen[reason] > 0, (reason, seen)
    assert sum(seen[f"duplicated_{n}_n_grams"] for n in range(6, 11)) > 0, seen
    assert seen[True] > 500


def test_decontamination_prefilter_finds_the_same_first_item_as_hashing_every_ngram():
    rng = random.Random(1)
    pool = texts(400, seed=2)
    items = [("task", str(i), " ".join(pool[rng.randrange(len(pool))].split()[: rng.randint(5, 40)]))
             for i in range(150)]
    index = NGramIndex(items, 13)

    def every_ngram(text):
        words = simplify_text(text).split()
        for i in range(len(words) - 12):
            key = hashlib.blake2b(" ".join(words[i:i + 13]).encode(), digest_size=8).digest()
            if key in index.index:
                return index.index[key]
        return None

    hits = 0
    for text in texts(800, seed=3) + pool:
        expected = every_ngram(text)
        assert index.match(text) == expected, text[:200]
        hits += expected is not None
    assert hits > 50  # planted overlaps are found, not just misses agreed on


def test_ascii_normalisation_fast_path_equals_simplify_text():
    samples = texts(500, seed=4) + ["Café déjà vu — naïve façade", "ÉCOLE 12,5 élèves", "ﬁne", "a\tb\x0bc\x1cd", "",
                                    "  Mixed   CASE, punctuation!!! 1,234.5 and\nnew lines  "]
    for text in samples:
        assert normalised(text) == simplify_text(text), text


def test_writer_writes_what_datatroves_default_adapter_writes(tmp_path):
    writer = jsonl_writer(tmp_path)
    doc = Document(text="a row", id="src#3", metadata={"row": {"messages": [{"role": "user", "content": "hé"}]},
                                                        "minhash": [1, 2**32 - 1], "order": 0, "filter_reason": "x"})
    assert json.dumps(writer.adapter(doc)) == json.dumps(writer._default_adapter(doc))


def test_token_counts_without_transformers_equal_the_transformers_tokenizer(smollm2, tiny_model):
    """The token-length filter counts plain text with `tokenizers` straight from tokenizer.json: the counts must be
    what the transformers tokenizer (what the trainer uses) gives, on prose, code, unicode and special-token text."""
    from transformers import AutoTokenizer

    from llmstack.data.filters import TokenLengthFilter, load_text_encoder

    samples = texts(120, seed=3) + [
        "", " ", "  leading and trailing  ", "naïve café — “quotes” 🙂 漢字 кириллица", "def f(x):\n\treturn x ** 2\n",
        "<|im_start|>user\nhi<|im_end|>\n", "a\u00a0b\u200bc", "ﬁ ligature, Ⅻ numeral, é vs e\u0301", "x" * 3000]
    for folder in (smollm2, tiny_model):
        encoder = load_text_encoder(str(folder))
        assert encoder is not None, f"{folder} should take the plain tokenizers path"
        reference = AutoTokenizer.from_pretrained(folder)(samples, add_special_tokens=False)["input_ids"]
        assert [e.ids for e in encoder.encode_batch(samples, add_special_tokens=False)] == reference
        assert TokenLengthFilter(str(folder), 1, None)._lengths(samples) == [len(ids) for ids in reference]


def test_the_chat_tokenizer_is_autotokenizers_without_its_imports(smollm2, tiny_model, tmp_path):
    """The token-length filter's chat tokenizer: for a folder whose tokenizer_config names the generic backend, the
    class AutoTokenizer picks, loaded directly: the same chat renderings and ids, and a process that only tokenizes
    (a curation worker) does not import AutoTokenizer's auto-model stack. Any other class goes through AutoTokenizer."""
    import shutil
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from llmstack.data.filters import load_tokenizer

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|im_start|> é 🙂"},
            {"role": "assistant", "content": "Hello!"}]
    tools = [{"type": "function", "function": {"name": "f", "description": "d",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for folder in (smollm2, tiny_model):
        ours, auto = load_tokenizer(str(folder)), AutoTokenizer.from_pretrained(folder)
        assert type(ours) is type(auto) and ours.special_tokens_map == auto.special_tokens_map
        for kw in ({}, {"add_generation_prompt": True}, {"tools": tools}):
            assert ours.apply_chat_template(conv, tokenize=False, **kw) == auto.apply_chat_template(
                conv, tokenize=False, **kw)
        text = ours.apply_chat_template(conv, tokenize=False)
        assert ours(text, add_special_tokens=False)["input_ids"] == auto(text, add_special_tokens=False)["input_ids"]

    code = ("import sys; from llmstack.data.filters import load_tokenizer; load_tokenizer(sys.argv[1]); "
            "print('transformers.models.auto.auto_factory' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True)
    assert proc.stdout.split() == ["False"], proc.stdout + proc.stderr

    llama = tmp_path / "llama-like"
    shutil.copytree(tiny_model, llama)
    config = json.loads((llama / "tokenizer_config.json").read_text())
    (llama / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    assert type(load_tokenizer(str(llama))) is type(AutoTokenizer.from_pretrained(llama))


def test_compiled_language_id_scores_bitwise_like_py3langid():
    import numpy as np
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    from llmstack.data.filters import langid_model

    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    samples = texts(150, seed=5) + [
        "Das ist ein deutscher Satz über das Wetter.", "C'est une phrase en français.",
        "Это предложение на русском языке.",
        "これは日本語の文です。", "هذه جملة باللغة العربية", "12 34 56", "", "HELLO", "\x00\x01", "🙂" * 20,
        b"\xff\xfe undecodable bytes", b"plain bytes", "x" * 5000]
    for text in samples:
        assert np.array_equal(langid_model()._decide(text), reference._decide(text)), text
        assert langid_model().classify(text) == reference.classify(text)
    assert langid_model()._scratch.sum() == 0  # the walk's per-feature scratch is left clean for the next row


def test_a_tokenizer_transformers_changes_is_not_read_raw(tmp_path, tiny_model):
    import shutil

    from llmstack.data.filters import load_text_encoder

    folder = tmp_path / "llama-like"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizer"}))
    assert load_text_encoder(str(folder)) is None  # its normaliser may be rebuilt by transformers: let it count


# ---------------------------------------------------------------- vectorised Gopher n-grams, signatures between passes

# tiny alphabets and word lengths, so glued n-grams collide across different word boundaries ("ab"+"c" = "a"+"bc")
_WORD = st.text(alphabet="abc", min_size=1, max_size=3) | st.sampled_from(["é", "—", "ab", "🙂", "x'y"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_WORD, max_size=60))
def test_vectorised_ngram_checks_equal_the_string_walks(words):
    import numpy as np

    from llmstack.data.gopher import (
        _starts,
        all_duplicate_chars,
        distinct_glued_sizes,
        top_duplicate_chars,
        top_duplicate_chars_ids,
    )

    spaced, starts = " ".join(words), _starts(words, 1)
    vocab: dict[str, int] = {}
    ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.int64)
    for n in (1, 2, 3, 4, 5):
        assert top_duplicate_chars_ids(ids, len(vocab), words, starts, n) == top_duplicate_chars(spaced, starts, n)
    glued, starts = "".join(words), _starts(words, 0)
    for n in distinct_glued_sizes(glued, starts, range(1, 11)):
        assert all_duplicate_chars(glued, starts, n) == 0, n  # "provably distinct" never hides a repeat


@settings(max_examples=300, deadline=None)
@given(st.lists(_WORD | st.sampled_from(["the", "of", "state", "\n", "\n\n", "- ", "...", "#"]), max_size=120))
def test_gopher_repetition_decides_like_datatrove_on_generated_texts(words):
    text = " ".join(words)
    doc = Document(text=text, id="x")
    assert GopherRepetition(language=WORDS).filter(doc) == GopherRepetitionFilter(language=WORDS).filter(doc)


def test_signatures_travel_between_passes_unchanged():
    import numpy as np
    from datasketch import LeanMinHash, MinHash

    from llmstack.data.dedup import DedupSignatures, pack_signature, unpack_signature

    signer = DedupSignatures(128, 5)
    for text in texts(50, seed=6) + ["", "one"]:
        values = signer.signature(text).hashvalues
        line = json.loads(json.dumps({"minhash": pack_signature(values)}))
        back = unpack_signature(line["minhash"])
        assert back.dtype == values.dtype and np.array_equal(back, values)
        assert np.array_equal(unpack_signature(values.tolist()), values)  # pass-1 files written before packing
        scheme = MinHash(num_perm=128, seed=1).scheme
        assert LeanMinHash(seed=1, hashvalues=back, scheme=scheme).jaccard(LeanMinHash(signer.signature(text))) == 1


def test_a_tasks_repeats_skip_signatures_without_changing_dedup_decisions():
    """With exact dedup on, a task signs only the first row of each normalised text it sees: the ordered pass drops
    the repeats as exact duplicates before near dedup either way. Same decisions, reasons and written metadata."""
    from llmstack.data.dedup import DedupSignatures, ExactDedupFilter, NearDedupFilter

    rng = random.Random(7)
    base = texts(60, seed=8)
    rows = []
    for _ in range(400):
        t = rng.choice(base)
        mode = rng.randrange(4)
        if mode == 1:
            t = t.upper() + " 12"  # an exact duplicate after normalisation
        elif mode == 2 and t:
            w = t.split()
            w[rng.randrange(len(w))] = "indeed"  # a near duplicate
            t = " ".join(w)
        rows.append(t)

    def decisions(exact_skip: bool, tasks: int):
        signed = []
        for rank in range(tasks):  # pass 1 per task, round-robin as SourceReader splits rows
            mine = [Document(text=t, id=str(i), metadata={"order": i}) for i, t in enumerate(rows) if i % tasks == rank]
            signed += list(DedupSignatures(128, 5, near=True, exact=exact_skip).run(iter(mine), rank, tasks))
        signed.sort(key=lambda d: d.metadata["order"])
        exact, near = ExactDedupFilter(), NearDedupFilter(0.8, 128, 5)
        out = []
        for doc in signed:
            doc = Document(text=doc.text, id=doc.id, metadata=json.loads(json.dumps(doc.metadata)))
            verdict = exact.filter(doc)
            if verdict is True:
                verdict = near.filter(doc)
            out.append((doc.id, verdict, json.dumps(doc.metadata, sort_keys=True)))
        return out

    for tasks in (1, 2, 3):
        slow = decisions(False, tasks)
        assert decisions(True, tasks) == slow
        assert sum(v is not True and v[1] == "exact duplicate" for _, v, _ in slow) > 50
        assert sum(v is not True and v[1].startswith("near") for _, v, _ in slow) > 5
