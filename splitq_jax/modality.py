"""Per-token modality codes, one definition for the whole package.

0 pad, 1 text (prompt and template tokens), 2 vision (image placeholders after expansion),
3 answer text (the reference answer of a calibration / evaluation sample; counts as text).
"""

PAD, TEXT, VISION, ANSWER = 0, 1, 2, 3

TEXT_TOKENS = ("non_vision", "answer")


def text_mask(modality, text_tokens: str = "non_vision"):
    """Tokens that count as text, ``(..., N)`` bool: every non-vision, non-pad token
    (``"non_vision"``) or only answer tokens (``"answer"``). MOCD's text set and MAC's token mask."""
    if text_tokens == "answer":
        return modality == ANSWER
    if text_tokens != "non_vision":
        raise ValueError(f"unknown text_tokens {text_tokens!r}: choose one of {', '.join(TEXT_TOKENS)}")
    return (modality == TEXT) | (modality == ANSWER)
