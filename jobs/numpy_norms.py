"""A Python job that uses numpy: the norm of each line's vector of numbers,
and their sum. numpy is not in antnest's wasm runner, so this job runs only
where a worker runs Python natively with numpy installed:

    antnest peer --allow-native-python --mesh-key KEY      # on each worker
    antnest submit jobs/numpy_norms.py --runtime native --input FILE

numpy is imported inside `processor`, as the master runs `split` and
`combine` in wasm: import native-only packages where taskunits need them.
"""


def processor(line):
    import numpy as np

    v = np.array([float(x) for x in line.split()])
    return float(np.linalg.norm(v))


def combine(norms):
    return f"{len(norms)} vectors, total norm {sum(norms):.6f}"
