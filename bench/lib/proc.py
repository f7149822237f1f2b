#!/usr/bin/env python3
"""Small /proc helpers for bench/run.sh (standard library only).

  proc.py rss PID            total VmRSS (KiB) of PID and all its descendants
  proc.py pss PID            total Pss (KiB) of PID and all its descendants (shared pages split
                             between the processes that map them)
  proc.py cpu PID            total utime+stime (clock ticks) of PID and all its descendants
                             (a process's stat counts all of its threads); prints "TICKS HZ"
  proc.py tree PID           PID and its descendants, one per line
  proc.py wait-listen PORT SECS [PID]
                             wait until something listens on 127.0.0.1:PORT (read from
                             /proc/net/tcp: no packet is sent); exit 1 on timeout or when PID
                             has died meanwhile
  proc.py wait-free PORT SECS
                             wait until nothing listens on PORT any more; exit 1 on timeout
  proc.py listen-pids PORT   pids holding a listening socket on PORT
"""
import os
import sys
import time


def children_map():
    kids = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        rest = data[data.rindex(b")") + 2:].split()
        ppid = int(rest[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(pid):
    kids = children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def rss_kib(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def pss_kib(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass
    return total


def cpu_ticks(pid):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # fields after "pid (comm) ": state is field 3, utime field 14, stime field 15
        rest = data[data.rindex(b")") + 2:].split()
        total += int(rest[11]) + int(rest[12])
    return total


def listening_inodes(port):
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    local, state, inode = cols[1], cols[3], cols[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        except OSError:
            pass
    return inodes


def listen_pids(port):
    inodes = listening_inodes(port)
    if not inodes:
        return []
    wanted = {f"socket:[{i}]" for i in inodes}
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{name}/fd/{fd}") in wanted:
                    pids.append(int(name))
                    break
            except OSError:
                pass
    return pids


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[0] != b"Z"
    except OSError:
        return False


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "rss":
        print(rss_kib(int(args[0])))
    elif cmd == "pss":
        print(pss_kib(int(args[0])))
    elif cmd == "cpu":
        print(cpu_ticks(int(args[0])), os.sysconf("SC_CLK_TCK"))
    elif cmd == "tree":
        print("\n".join(map(str, tree(int(args[0])))))
    elif cmd == "wait-listen":
        port, secs = int(args[0]), float(args[1])
        pid = int(args[2]) if len(args) > 2 else None
        end = time.monotonic() + secs
        while time.monotonic() < end:
            if listening_inodes(port):
                return 0
            if pid is not None and not alive(pid):
                return 1
            time.sleep(0.02)
        return 1
    elif cmd == "wait-free":
        port, secs = int(args[0]), float(args[1])
        end = time.monotonic() + secs
        while time.monotonic() < end:
            if not listening_inodes(port):
                return 0
            time.sleep(0.05)
        return 1
    elif cmd == "listen-pids":
        print("\n".join(map(str, listen_pids(int(args[0])))))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
