
import json as _json, os as _os, sys as _sys, traceback as _tb
def _run(_token, _program, _setup, _tests, _entry):
    def report(status, detail=""):
        try:
            _sys.stdout.flush()
        except BaseException:
            pass
        _os.write(1, ("\n%s %s %s\n" % (_token, status, _json.dumps(str(detail)[:1500]))).encode())
        _os._exit(0)
    def where(e, name, src):
        frames = [f for f in _tb.extract_tb(e.__traceback__) if f.filename == name]
        if not frames:
            return ""
        f = frames[-1]
        lines = src.splitlines()[f.lineno - 1:(getattr(f, "end_lineno", None) or f.lineno)]
        return " ".join(l.strip() for l in lines)[:500]
    def failed(e):
        msg = "%s: %s" % (type(e).__name__, e) if str(e) else type(e).__name__
        return msg[:500]
    ns = {"__name__": "solution", "__builtins__": __builtins__}
    try:
        exec(compile(_program, "<solution>", "exec"), ns)
    except BaseException as e:
        line = where(e, "<solution>", _program)
        report("ERROR", "the program raised " + failed(e) + (" at: " + line if line else ""))
    if _entry and _entry not in ns:
        report("ERROR", "the program defines no %s" % _entry)
    tests = (_setup + "\n" if _setup else "") + _tests
    try:
        exec(compile(tests, "<tests>", "exec"), ns)
        if _entry and callable(ns.get("check")):
            ns["check"](ns[_entry])
    except AssertionError as e:
        frames = _tb.extract_tb(e.__traceback__)
        if frames and frames[-1].filename == "<tests>":  # the test's own assertion
            report("FAIL", "failed: " + where(e, "<tests>", tests) + (" (%s)" % e if str(e) else ""))
        report("ERROR", failed(e) + " in the program, while running: " + where(e, "<tests>", tests))
    except BaseException as e:
        line = where(e, "<tests>", tests)
        report("ERROR", failed(e) + (", while running: " + line if line else ""))
    report("PASS")
_t = _sys.stdin.readline().strip()
_sys.stdin = open(_os.devnull)
