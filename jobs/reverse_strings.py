"""The original antnest job, in Python: reverse every line of the input.

Write the same three functions as in the original antnest; `split` and
`combine` are optional (default: one taskunit per line; results joined by
newlines). Run it with:  antnest submit jobs/reverse_strings.py --input FILE
"""


def processor(taskunit: str) -> str:
    return taskunit[::-1]
