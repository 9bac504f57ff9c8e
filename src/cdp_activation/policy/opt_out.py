"""What in a customer's message means "stop" (or "start again").

Carriers and providers treat a handful of keywords as binding: STOP, STOPALL, UNSUBSCRIBE,
CANCEL, END and QUIT opt a number out of a sender's SMS (US carrier rules, which Twilio
enforces); START and UNSTOP opt it back in. The demo's languages add their usual words. A
message is an opt-out when its whole text, trimmed and upper-cased, is one of them ("Stop" is;
"don't stop the offers" is not). Meta's marketing templates carry a "Stop promotions" quick
reply: tapping it opts out of marketing messages only. Both lists can be replaced
(CDP_OPT_OUT_KEYWORDS, CDP_OPT_IN_KEYWORDS, comma-separated).
"""

from __future__ import annotations

import dataclasses
import unicodedata
from functools import cache

from cdp_activation.contracts import ALL_PURPOSES, OPT_IN, OPT_OUT, InboundMessage

OPT_OUT_KEYWORDS = frozenset(
    {
        "STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT",
        "PARAR", "BAJA", "CANCELAR",  # es
        "SAIR", "PARE",  # pt
        "ARRET", "ARRETER", "DESABONNER",  # fr
        "STOPP", "ABMELDEN",  # de
        "ANNULLA", "DISISCRIVI",  # it
    }
)  # fmt: skip
OPT_IN_KEYWORDS = frozenset({"START", "UNSTOP", "YES", "INICIAR", "ARRANCAR"})
# Quick-reply buttons that opt out of marketing (Meta's "Stop promotions", its translations).
MARKETING_STOP_BUTTONS = frozenset(
    {"STOP PROMOTIONS", "STOP PROMOTION", "DETENER PROMOCIONES", "PARAR PROMOÇÕES", "UNSUBSCRIBE"}
)
KEYWORD, BUTTON = "keyword", "button"


def _folded(text: str) -> str:
    """Trimmed, upper-cased, accents removed, trailing punctuation dropped: "Arrêt!" -> ARRET."""
    decomposed = unicodedata.normalize("NFKD", text.strip())
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return plain.upper().rstrip(".!¡?¿ ").lstrip("¡¿ ")


@cache
def _folded_words(words: frozenset[str]) -> frozenset[str]:
    return frozenset(_folded(w) for w in words)


def classify(
    message: InboundMessage,
    opt_out: frozenset[str] = OPT_OUT_KEYWORDS,
    opt_in: frozenset[str] = OPT_IN_KEYWORDS,
) -> InboundMessage:
    """The message with `opt`, `purpose` and `reason` set when it opts out or back in."""
    word = _folded(message.text)
    if not word:
        return message
    if message.kind in ("button", "interactive") and word in _folded_words(MARKETING_STOP_BUTTONS):
        return dataclasses.replace(message, opt=OPT_OUT, purpose="marketing", reason=BUTTON)
    if word in _folded_words(opt_out):
        return dataclasses.replace(message, opt=OPT_OUT, purpose=ALL_PURPOSES, reason=KEYWORD)
    if word in _folded_words(opt_in):
        return dataclasses.replace(message, opt=OPT_IN, purpose=ALL_PURPOSES, reason=KEYWORD)
    return message


def summary(message: InboundMessage) -> str:
    """What is kept of a message: its kind, and for an opt-out or -in the word that made it
    one; never the rest of its text."""
    if message.opt is not None:
        return f"{message.kind}: opt-{message.opt} ({message.reason}) {_folded(message.text)}"[:120]
    return f"{message.kind} ({len(message.text)} characters)" if message.text else message.kind


def keywords(setting: str, default: frozenset[str]) -> frozenset[str]:
    """A comma-separated keyword setting (CDP_OPT_OUT_KEYWORDS…); empty: the default list."""
    words = frozenset(w.strip() for w in setting.split(",") if w.strip())
    return words or default
