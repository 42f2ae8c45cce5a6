
import json, os, socket, sys
r = {"python": sys.version.split()[0]}
r["ifaces"] = [l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]]
s = socket.socket()
s.settimeout(1)
try:
    s.connect(("127.0.0.1", 9))
    r["connect"] = "connected"
except OSError as e:
    r["connect"] = e.errno
r["ro"] = bool(os.statvfs("/").f_flag & os.ST_RDONLY)
open("probe.txt", "w").write("x")
r["writable"] = open("probe.txt").read() == "x"
r["capeff"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
print(json.dumps(r))
