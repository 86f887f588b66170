"""Cleaning: each step does its job, can be switched off, and keeps code intact."""

import dataclasses

from dsllm.data.cleaning import (
    CleaningConfig,
    Deduplicator,
    clean,
    document_hash,
    drop_reason,
    normalize_unicode,
    normalize_whitespace,
    strip_html,
)

ALL_ON = CleaningConfig()


def test_strip_html_tags_scripts_comments_and_entities():
    page = (
        "<!DOCTYPE html><html><head><style>p {color: red}</style><script>var a = 1 < 2;</script></head>"
        "<body><!-- nav --><h1>Title</h1><p>Fish &amp; chips &lt;3 &#8364;5</p><div>next<br/>line</div></body></html>"
    )
    text = strip_html(page)
    assert "color" not in text and "var a" not in text and "nav" not in text and "<" not in text.replace("<3", "")
    assert normalize_whitespace(text) == "Title\n\nFish & chips <3 €5\n\nnext\nline"


def test_strip_html_leaves_comparisons_alone():
    assert strip_html("if a < b and c > d: pass") == "if a < b and c > d: pass"
    assert strip_html("plain text, no markup") == "plain text, no markup"


def test_unicode_nfc_and_control_characters():
    decomposed = "cafe\u0301"
    assert normalize_unicode(decomposed) == "caf\u00e9"
    assert normalize_unicode("a\x00b\x07c\x1bd\x7fe\x9ff\tg\nh") == "abcdef\tg\nh"
    assert normalize_unicode("page\x0cbreak") == "page\nbreak"


def test_whitespace_keeps_indentation_and_trims_the_rest():
    code = "def f():\r\n    return 1   \r\n\n\n\n\nclass A:\u00a0\n\tpass\n"
    assert normalize_whitespace(code) == "def f():\n    return 1\n\nclass A:\n\tpass"


def test_every_step_can_be_switched_off():
    text = "<p>caf\u0065\u0301 &amp;\x00</p>   \n\n\n\nend"
    assert clean(text, CleaningConfig(strip_html=False, normalize_unicode=False, normalize_whitespace=False)) == text
    assert "<p>" in clean(text, dataclasses.replace(ALL_ON, strip_html=False))
    assert "\u0301" in clean(text, dataclasses.replace(ALL_ON, normalize_unicode=False))
    assert "\n\n\n" in clean(text, dataclasses.replace(ALL_ON, normalize_whitespace=False))
    assert clean(text, ALL_ON) == "caf\u00e9 &\n\nend"


def test_drop_reasons_and_min_length():
    assert drop_reason("", ALL_ON) == "empty"
    assert drop_reason("short", ALL_ON) == "too_short"
    assert drop_reason("short", CleaningConfig(min_chars=0)) is None
    assert drop_reason("x" * 32, ALL_ON) is None


def test_dedup_uses_the_cleaned_text_and_can_be_off():
    a, b = clean("<p>Same  text</p>\n", ALL_ON), clean("Same  text", ALL_ON)
    assert document_hash(a) == document_hash(b)
    dedup = Deduplicator(enabled=True)
    assert [dedup.is_duplicate(document_hash(t)) for t in (a, b, "other")] == [False, True, False]
    off = Deduplicator(enabled=False)
    assert [off.is_duplicate(document_hash(t)) for t in (a, b)] == [False, False]


# Which characters each step rewrites, whatever path it takes: ASCII texts and other texts are checked for
# work to do in different ways (see cleaning._holds_any), so every case runs on both kinds of text.
NON_ASCII = "\u00e9"  # left alone by every step


def test_control_characters_removed_in_ascii_and_non_ascii_text():
    for code in (*range(0x20), *range(0x7F, 0xA0)):
        c = chr(code)
        expected = c if c in "\t\n\r" else "\n" if c in "\x0b\x0c\x85" else ""
        assert normalize_unicode(f"a{c}b") == f"a{expected}b", hex(code)
        assert normalize_unicode(f"a{c}b{NON_ASCII}") == f"a{expected}b{NON_ASCII}", hex(code)
    assert normalize_unicode("plain ascii\tstays\n") == "plain ascii\tstays\n"


def test_whitespace_same_with_and_without_non_ascii_text():
    texts = [
        "a\x0bb\x0cc",
        "a  \nb\t\nc",
        "a\n\nb",
        "a\n\n\nb\n\n\n\n\n\nc",
        "a\r\n\r\n\r\nb\rc",
        "  a",
        "x" * 40,
        "def f():\n    pass\n\n\nclass A:\n\tpass",
    ]
    expected = [
        "a\nb\nc",
        "a\nb\nc",
        "a\n\nb",
        "a\n\nb\n\nc",
        "a\n\nb\nc",
        "a",
        "x" * 40,
        "def f():\n    pass\n\nclass A:\n\tpass",
    ]
    for text, want in zip(texts, expected):
        assert normalize_whitespace(text) == want, repr(text)
        assert normalize_whitespace(text + NON_ASCII) == want + NON_ASCII, repr(text)


def test_unicode_spaces_and_line_separators_only_in_non_ascii_text():
    for c in "\u0085\u2028\u2029":
        assert normalize_whitespace(f"a{c}b") == "a\nb"
    for c in ("\u00a0", "\u1680", *map(chr, range(0x2000, 0x200B)), "\u202f", "\u205f", "\u3000"):
        assert normalize_whitespace(f"a{c}b") == "a b", hex(ord(c))
        assert normalize_whitespace(f"a{c}  \n\n\n\nb") == "a\n\nb", hex(ord(c))  # then trailing spaces, blank runs
    assert normalize_whitespace("a\u200bb") == "a\u200bb"  # zero-width space is not whitespace: kept
