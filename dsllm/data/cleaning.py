"""Document cleaning: each step on by default and switchable. Runs in the tokenizer workers.

Order: strip HTML -> unicode (NFC, control characters) -> whitespace -> length; exact-duplicate
removal uses the hash of the cleaned text and happens in the process that writes (it needs the
global set of hashes), and so does near-duplicate removal (`near_dedup`, off by default) after it.
Whitespace normalisation keeps indentation, so code survives it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import re
import unicodedata

from dsllm.data.near_dedup import DEFAULT_THRESHOLD, NUM_PERM, SHINGLE_WORDS
from dsllm.errors import UserError

# Tags that end a line of text: replaced by a newline so words on either side do not merge.
_BLOCK_TAGS = (
    "address|article|aside|blockquote|br|dd|div|dl|dt|fieldset|figcaption|figure|footer|form|h[1-6]|"
    "header|hr|li|main|nav|ol|p|pre|section|table|tbody|td|tfoot|th|thead|tr|ul"
)
_SCRIPT_STYLE = re.compile(r"<(script|style|noscript)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->|<!DOCTYPE[^>]*>", re.IGNORECASE | re.DOTALL)
_BLOCK_TAG = re.compile(rf"</?(?:{_BLOCK_TAGS})\b[^<>]*>", re.IGNORECASE)
_ANY_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>")
# Control characters (Unicode category Cc: U+0000-001F, U+007F-009F) are removed, except tab, newline
# and carriage return (whitespace handles it); vertical tab, form feed and NEL separate lines: newline.
_CONTROL: dict[int, str | None] = {c: None for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\t\n\r"}
_CONTROL.update({0x0B: "\n", 0x0C: "\n", 0x85: "\n"})
# One translate pass (C speed) maps line separators to newline and unusual spaces to a space.
_WHITESPACE: dict[int, str] = {c: "\n" for c in (0x0B, 0x0C, 0x85, 0x2028, 0x2029)}
_WHITESPACE.update({c: " " for c in (0xA0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000)})
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_BLANK_RUN = re.compile(r"\n\n\n+")  # spelled out, not \n{3,}: a literal prefix makes the search ~7x faster


def _detector(table: dict) -> tuple[tuple[str, ...], re.Pattern]:
    """Whether a text holds a key of a translate table: most texts hold none, and a search is far cheaper
    than a translate (which copies the text). ASCII texts check the table's ASCII characters one by one
    (`in` on a one-byte string is a memchr, ~10x faster than a regex); other texts use a character class."""
    return (
        tuple(chr(c) for c in table if c < 0x80),
        re.compile("[" + "".join(re.escape(chr(c)) for c in sorted(table)) + "]"),
    )


_CONTROL_ASCII, _CONTROL_CHARS = _detector(_CONTROL)
_WHITESPACE_ASCII, _WHITESPACE_CHARS = _detector(_WHITESPACE)


def _holds_any(text: str, ascii_chars: tuple[str, ...], pattern: re.Pattern) -> bool:
    if text.isascii():  # O(1): CPython records it
        return any(c in text for c in ascii_chars)
    return pattern.search(text) is not None


@dataclasses.dataclass(frozen=True)
class CleaningConfig:
    strip_html: bool = True
    normalize_unicode: bool = True
    normalize_whitespace: bool = True
    dedup: bool = True
    min_chars: int = 32
    near_dedup: float | None = None  # the Jaccard threshold of near-duplicate removal; None: off

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def strip_html(text: str) -> str:
    """Drop scripts, styles, comments and tags (block tags become newlines), then decode entities."""
    if "<" in text:
        text = _SCRIPT_STYLE.sub(" ", text)
        text = _COMMENT.sub("", text)
        text = _BLOCK_TAG.sub("\n", text)
        text = _ANY_TAG.sub("", text)
    if "&" in text:
        text = html.unescape(text)
    return text


def normalize_unicode(text: str) -> str:
    """NFC normal form; control characters removed (line-separating ones become newlines)."""
    text = unicodedata.normalize("NFC", text)
    if _holds_any(text, _CONTROL_ASCII, _CONTROL_CHARS):
        text = text.translate(_CONTROL)
    return text


def normalize_whitespace(text: str) -> str:
    """Unify line breaks and odd spaces, drop trailing spaces, at most one blank line in a row, trim
    the ends. Indentation is kept."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if _holds_any(text, _WHITESPACE_ASCII, _WHITESPACE_CHARS):
        text = text.translate(_WHITESPACE)
    if " \n" in text or "\t\n" in text:  # each regex only where it has work: they are the slow part
        text = _TRAILING_SPACE.sub("\n", text)
    if "\n\n\n" in text:
        text = _BLANK_RUN.sub("\n\n", text)
    return text.strip()


def clean(text: str, config: CleaningConfig) -> str:
    if config.strip_html:
        text = strip_html(text)
    if config.normalize_unicode:
        text = normalize_unicode(text)
    if config.normalize_whitespace:
        text = normalize_whitespace(text)
    return text


def document_hash(text: str) -> bytes:
    """Exact-duplicate key of a cleaned document (8 bytes: collisions negligible below ~10^8 documents)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()


DROP_REASONS = ("empty", "too_short", "duplicate")
NEAR_DUPLICATE = "near_duplicate"  # a reason of its own, in reports only when near-dedup is on


def drop_reason(cleaned: str, config: CleaningConfig) -> str | None:
    """Why a cleaned document is dropped before tokenization (duplicates are decided later), or None."""
    if not cleaned:
        return "empty"
    if len(cleaned) < config.min_chars:
        return "too_short"
    return None


@dataclasses.dataclass
class CleaningReport:
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    @classmethod
    def for_config(cls, cleaning: CleaningConfig) -> CleaningReport:
        report = cls()
        if cleaning.near_dedup is not None:
            report.dropped[NEAR_DUPLICATE] = 0
        return report

    def as_dict(self) -> dict:
        return {"documents_read": self.read, "dropped": dict(self.dropped), "documents_kept": self.kept}

    def dropped_summary(self) -> str:
        return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in self.dropped.items() if n) or "none"

    def check_not_empty(self, inputs) -> None:
        """An empty corpus, or one that cleaning emptied, is a user error naming the inputs and the fix."""
        names = ", ".join(map(str, inputs))
        if self.read == 0:
            raise UserError(f"{names}: the corpus is empty (no documents read); check the input files")
        if self.kept == 0:
            raise UserError(
                f"{names}: all {self.read} documents were dropped by cleaning ({self.dropped_summary()}); "
                "lower --min-chars or turn off the step that drops them"
            )


class Deduplicator:
    """Remembers the hashes of kept documents (about 110 bytes of memory per unique document, measured)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._seen: set[bytes] = set()

    def is_duplicate(self, digest: bytes) -> bool:
        if not self.enabled:
            return False
        if digest in self._seen:
            return True
        self._seen.add(digest)
        return False


def add_cleaning_arguments(parser) -> None:
    """The cleaning switches, shared by the tokenizer trainer and `prepare`."""
    group = parser.add_argument_group("cleaning (every step is on by default)")
    group.add_argument(
        "--no-strip-html",
        dest="strip_html",
        action="store_false",
        help="keep HTML tags and entities (turn off for code corpora)",
    )
    group.add_argument(
        "--no-normalize-unicode",
        dest="normalize_unicode",
        action="store_false",
        help="skip NFC normalisation and control-character removal",
    )
    group.add_argument(
        "--no-normalize-whitespace",
        dest="normalize_whitespace",
        action="store_false",
        help="keep line breaks, trailing spaces and blank-line runs as they are",
    )
    group.add_argument("--no-dedup", dest="dedup", action="store_false", help="keep exact duplicate documents")
    group.add_argument(
        "--near-dedup",
        action="store_true",
        help=f"also drop near duplicates (MinHash LSH over word {SHINGLE_WORDS}-grams, {NUM_PERM} permutations; "
        "off by default)",
    )
    group.add_argument(
        "--near-dedup-threshold",
        type=float,
        default=None,
        metavar="J",
        help=f"Jaccard similarity of the near-dedup in (0, 1] (default {DEFAULT_THRESHOLD}); implies --near-dedup",
    )
    group.add_argument(
        "--min-chars",
        type=int,
        default=CleaningConfig.min_chars,
        metavar="N",
        help="drop documents shorter than N characters after cleaning; 0 keeps every non-empty one",
    )


def cleaning_config_from_args(args) -> CleaningConfig:
    if args.min_chars < 0:
        raise UserError(f"--min-chars is {args.min_chars}; give 0 or more")
    threshold = args.near_dedup_threshold
    if threshold is not None and not 0 < threshold <= 1:  # nan fails the comparison too
        raise UserError(
            f"--near-dedup-threshold {threshold:g} is outside (0, 1]: it is the Jaccard similarity of word "
            f"{SHINGLE_WORDS}-gram sets above which documents are near duplicates (default {DEFAULT_THRESHOLD})"
        )
    if threshold is None and args.near_dedup:
        threshold = DEFAULT_THRESHOLD
    return CleaningConfig(
        strip_html=args.strip_html,
        normalize_unicode=args.normalize_unicode,
        normalize_whitespace=args.normalize_whitespace,
        dedup=args.dedup,
        min_chars=args.min_chars,
        near_dedup=threshold,
    )
