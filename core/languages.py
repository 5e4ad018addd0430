"""Languages Whisper models know (ISO 639-1 codes, plus 'haw' and 'yue'), and BCP-47 parsing.

Our own copy, so the API server validates language codes without importing faster-whisper;
a unit test keeps it equal to faster-whisper's table.
"""
from __future__ import annotations

WHISPER_LANGUAGES = frozenset({
    "af", "am", "ar", "as", "az", "ba", "be", "bg", "bn", "bo", "br", "bs", "ca", "cs", "cy", "da", "de",
    "el", "en", "es", "et", "eu", "fa", "fi", "fo", "fr", "gl", "gu", "ha", "haw", "he", "hi", "hr", "ht",
    "hu", "hy", "id", "is", "it", "ja", "jw", "ka", "kk", "km", "kn", "ko", "la", "lb", "ln", "lo", "lt",
    "lv", "mg", "mi", "mk", "ml", "mn", "mr", "ms", "mt", "my", "ne", "nl", "nn", "no", "oc", "pa", "pl",
    "ps", "pt", "ro", "ru", "sa", "sd", "si", "sk", "sl", "sn", "so", "sq", "sr", "su", "sv", "sw", "ta",
    "te", "tg", "th", "tk", "tl", "tr", "tt", "uk", "ur", "uz", "vi", "yi", "yo", "yue", "zh",
})


def whisper_language(code: str) -> str | None:
    """BCP-47 code -> Whisper language (its primary subtag); None for auto/empty.

    Raises ValueError when Whisper does not know the language.
    """
    code = code.strip()
    if not code or code.lower() == "auto":
        return None
    primary = code.replace("_", "-").split("-")[0].lower()
    if primary not in WHISPER_LANGUAGES:
        raise ValueError(code)
    return primary
