
import ctypes, json, os, re, resource, sys
cfg = json.loads(sys.argv[1])
st = cfg["status_fd"]
def report(line):
    os.write(st, (line.replace("\n", " ")[:2000] + "\n").encode())
def check(rc, what):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, what + ": " + os.strerror(e))
try:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    wd = cfg["workdir"].encode()
    if cfg["readonly"]:
        MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND = 1, 2, 4, 8, 32, 4096
        with open(cfg["program"], "rb") as f:
            prog = f.read()
        ro = (ctypes.c_uint64 * 4)(1, 0, 0, 0)  # struct mount_attr: attr_set=MOUNT_ATTR_RDONLY
        SYS_mount_setattr, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000
        if cfg.get("legacy_remount") or libc.syscall(SYS_mount_setattr, AT_FDCWD, b"/", AT_RECURSIVE, ro, 32) != 0:
            # kernels before 5.12: remount each mount read-only, keeping its locked flags
            keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
                    "nodiratime": 2048, "relatime": 1 << 21}
            unesc = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
            for line in open("/proc/self/mountinfo").read().splitlines():
                f = line.split()
                mp, opts = unesc(f[4]), f[5].split(",")
                flags = MS_REMOUNT | MS_BIND | MS_RDONLY
                for o in opts:
                    flags |= keep.get(o, 0)
                if not {"noatime", "relatime"} & set(opts):
                    flags |= 1 << 24  # MS_STRICTATIME
                libc.mount(None, mp.encode(), None, flags, None)
        # the work folder: a fresh tmpfs, so what the program writes is bounded in total too
        opts = "size=%d,mode=0755" % cfg["folder_bytes"]
        check(libc.mount(b"tmpfs", wd, b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()), "work folder tmpfs")
        with open(cfg["program"], "wb") as f:
            f.write(prog)
        if not os.statvfs("/").f_flag & os.ST_RDONLY:
            raise OSError("/ is still writable")
        if os.statvfs(cfg["workdir"]).f_flag & os.ST_RDONLY:
            raise OSError("the work folder is read-only")
    libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: the program cannot ptrace its init
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.set_inheritable(st, False)
            if cfg["drop_caps"]:
                last = int(open("/proc/sys/kernel/cap_last_cap").read())
                for cap in range(last + 1):
                    check(libc.prctl(24, cap, 0, 0, 0), "drop capability")  # PR_CAPBSET_DROP
            check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")  # PR_SET_NO_NEW_PRIVS
            for name, soft, hard in cfg["rlimits"]:
                resource.setrlimit(getattr(resource, name), (soft, hard))
            os.chdir(cfg["workdir"])
            os.close(w)  # tells init: setup done, exec next
            os.execve(cfg["python"], [cfg["python"], "-I", cfg["program"]], cfg["env"])
        except BaseException as e:
            try:
                report("error %s: %s" % (type(e).__name__, e))
            finally:
                os._exit(125)
    os.close(w)
    os.read(r, 1)  # EOF when the child closed it (about to exec) or died
    os.close(r)
    report("ok")
    while True:
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            report("exit %d" % os.WEXITSTATUS(status))
            break
        if os.WIFSIGNALED(status):
            report("signal %d" % os.WTERMSIG(status))
            break
except BaseException as e:
    try:
        report("error %s: %s" % (type(e).__name__, e))
    finally:
        os._exit(125)
