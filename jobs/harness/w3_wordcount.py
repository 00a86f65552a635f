"""The peer harness's W3 as a Python user writes it: each chunk (one input
line) counted with Counter and returned as a plain dict (it travels
pickled), the dicts merged in combine(), which writes `word<TAB>count`
lines sorted by word.
"""

from collections import Counter


def processor(chunk):
    return dict(Counter(chunk.split()))


def combine(results):
    total = Counter()
    for counts in results:
        total.update(counts)
    return "".join(f"{word}\t{count}\n" for word, count in sorted(total.items()))
