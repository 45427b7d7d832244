"""Format adapters and cleaning: each input format becomes the canonical row; bad records get a reason; PII is
redacted with the right kind; Luhn separates card numbers from other digit runs."""

from collections import Counter

import pytest

from llmstack.data.filters import clean_text, luhn_ok, redact_pii
from llmstack.data.formats import BadRow, detect, to_row

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "system": "Be brief.",
          "history": [["hi", "Hello!"]]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am {{name}}."}]}
LF_PREF = {"conversations": [{"from": "human", "value": "Pick one."}], "chosen": {"from": "gpt", "value": "A"},
           "rejected": {"from": "gpt", "value": "B"}}


def test_alpaca_becomes_chat_with_system_history_and_input():
    row = to_row(ALPACA, "auto", "messages", {})
    assert row == {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]}


def test_sharegpt_with_placeholders():
    row = to_row(SHAREGPT, "sharegpt", "messages", {"name": "llmstack"})
    assert row["messages"][1] == {"role": "assistant", "content": "I am llmstack."}
    with pytest.raises(BadRow, match=r"unfilled placeholder \{\{name\}\}"):
        to_row(SHAREGPT, "sharegpt", "messages", {})


def test_preference_formats_become_trl_conversational():
    row = to_row(LF_PREF, "auto", "preference", {})
    assert row == {"prompt": [{"role": "user", "content": "Pick one."}],
                   "chosen": [{"role": "assistant", "content": "A"}],
                   "rejected": [{"role": "assistant", "content": "B"}]}
    plain = to_row({"prompt": "Pick one.", "chosen": "A", "rejected": "B"}, "auto", "preference", {})
    assert plain == row


def test_openai_messages_kto_and_text():
    msgs = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert to_row(msgs, "auto", "messages", {}) == msgs
    assert detect({**msgs, "label": True}) == "kto"
    assert to_row({**msgs, "label": True}, "auto", "messages", {}) == msgs
    with pytest.raises(BadRow, match="kto: label is not true"):
        to_row({**msgs, "label": False}, "auto", "messages", {})
    assert to_row({"body": "hello"}, "text", "text", {}, text_field="body") == {"text": "hello"}


def test_kto_records_become_unpaired_rows_with_either_label():
    turns = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
             {"role": "assistant", "content": "a"}]
    for label in (True, False):
        assert to_row({"messages": turns, "label": label}, "auto", "unpaired", {}) == {
            "prompt": turns[:2], "completion": turns[2:], "label": label}
    with pytest.raises(BadRow, match="label must be true or false"):
        to_row({"messages": turns, "label": "yes"}, "kto", "unpaired", {})
    with pytest.raises(BadRow, match="a messages record makes a messages row, but this dataset's schema is unpaired"):
        to_row({"messages": turns}, "auto", "unpaired", {})  # no label: not KTO data


@pytest.mark.parametrize("rec, reason", [
    ({"instruction": "x"}, r"missing field\(s\) output"),
    ({"instruction": "x", "output": 5}, "output must be a string, got int"),
    ({"conversations": "hi"}, "conversations must be a list"),
    ({"conversations": [{"from": "gpt", "value": "a"}]}, "must start with a user turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "alien", "value": "a"}]}, "unsupported role"),
    ({"conversations": [{"from": "human", "value": "q"}]}, "must end with an assistant turn"),
    ({"foo": 1}, "cannot tell the format"),
])
def test_malformed_records_get_a_reason(rec, reason):
    with pytest.raises(BadRow, match=reason):
        to_row(rec, "auto", "messages", {})


def test_schema_mismatch_is_a_bad_row():
    with pytest.raises(BadRow, match="makes a preference row, but this dataset's schema is messages"):
        to_row(LF_PREF, "auto", "messages", {})


def test_luhn():
    assert luhn_ok("4111 1111 1111 1111") and luhn_ok("5500-0000-0000-0004")
    assert not luhn_ok("4111 1111 1111 1112") and not luhn_ok("1234")


def test_pii_redaction_kinds_and_negatives():
    counts = Counter()
    text = ("Mail bob.smith@corp.example.com or call +1 415-555-0134. Card 4111 1111 1111 1111, "
            "not a card: 4111 1111 1111 1112. Server 8.8.8.8, router 192.168.0.1. "
            "key sk-abcdefghijklmnopqrstuvwxyz123456 and AKIAABCDEFGHIJKLMNOP. In 1999-2004 pi was 3.14159.")
    out = redact_pii(text, counts)
    assert counts == Counter({"EMAIL": 1, "PHONE": 1, "CREDIT_CARD": 1, "IP": 1, "SECRET": 2})
    for kept in ("4111 1111 1111 1112", "192.168.0.1", "1999-2004", "3.14159"):
        assert kept in out
    for gone in ("bob.smith", "415-555-0134", "4111 1111 1111 1111", "8.8.8.8", "sk-abc", "AKIA"):
        assert gone not in out


def test_pii_leaves_look_alikes_in_real_data_alone():
    # Seen in LLaMA-Factory's dpo_en_demo: sums that pass Luhn, and a placeholder password.
    for text in ("256626720691 + 1646615806005 = 4212883012996", "472547338 + 960397912423686 = 960398384971024",
                 "EMAIL_PASSWORD = 'your_email_password'", "Budget 1946 67,229 1945 100, 031"):
        counts = Counter()
        assert redact_pii(text, counts) == text and not counts
    assert redact_pii('api_key = "a8f3k2j9d8s7f6g5h4j3"') == 'api_key = "<SECRET>"'


def test_unicode_repair_keeps_curly_quotes_and_cjk_punctuation():
    counts = Counter()
    assert clean_text("Itâ€™s caf\u0065\u0301", True, False, counts) == "It’s café"
    assert counts["unicode_fixed"] == 1
    assert clean_text("“quoted” 您好，我", True, False, Counter()) == "“quoted” 您好，我"
