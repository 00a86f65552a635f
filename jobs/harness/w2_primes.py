"""The peer harness's W2 as a Python user writes it: the same pure-Python
count_primes Ray, Dask and multiprocessing run, one taskunit per line (N),
the counts summed in combine().
"""


def count_primes(n):
    count = 0
    for k in range(2, n):
        d = 2
        is_p = True
        while d * d <= k:
            if k % d == 0:
                is_p = False
                break
            d += 1
        if is_p:
            count += 1
    return count


def processor(line):
    return count_primes(int(line))


def combine(results):
    return str(sum(results))
