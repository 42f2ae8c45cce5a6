
def _distill_plain(v):
    if isinstance(v, (list, tuple)):
        return [_distill_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _distill_plain(x) for k, x in v.items()}
    return v
def _distill_eq(got, expected):
    got, expected = _distill_plain(got), _distill_plain(expected)
    return got == expected or (isinstance(expected, list) and len(expected) == 1 and got == expected[0])
def _distill_fn(name):
    cls = globals().get("Solution")
    if isinstance(cls, type) and hasattr(cls, name):
        return getattr(cls(), name)
    return globals()[name]
