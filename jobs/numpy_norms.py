"""A Python job that uses numpy: the norm of each line's vector of numbers,
and their sum. numpy is not in antnest's wasm runner, so this job runs only
where Python runs natively with numpy installed, the master included (its
peer runs the split, if wasm cannot import the job, and the combine in its
own CPython):

    antnest peer --allow-native-python --mesh-key KEY      # on each peer
    antnest submit jobs/numpy_norms.py --runtime native --input FILE
"""

import numpy as np


def processor(line):
    v = np.array([float(x) for x in line.split()])
    return float(np.linalg.norm(v))


def combine(norms):
    return f"{len(norms)} vectors, total norm {np.sum(norms):.6f}"
