"""The peer harness's W1 as a Python user writes it: reverse each string.

One taskunit per input line (antnest's own line split, as no split() is
given); the results are joined by newlines (no combine() given).
"""


def processor(s):
    return s[::-1]
