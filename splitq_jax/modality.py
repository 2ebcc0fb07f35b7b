"""Per-token modality codes, one definition for the whole package.

0 pad, 1 text (prompt and template tokens), 2 vision (image placeholders after expansion),
3 answer text (the reference answer of a calibration / evaluation sample; counts as text).
"""

PAD, TEXT, VISION, ANSWER = 0, 1, 2, 3
