#!/usr/bin/env python3
"""Write a proxy's benchmark config from bench/configs/<proxy>.*.in.

  genconf.py PROXY --port P --backend 127.0.0.1:9100 --dir WORKDIR [--logdir DIR] [--hosts N]
             --out FILE

PROXY is gatehouse, nginx, haproxy or caddy (pingora-ref takes flags, not a file).
--hosts 0 (the default) routes every request on "/" to the backend; --hosts N routes only the
N names h0.example.com ... h<N-1>.example.com there (the large in-memory state run), and
everything else gets a 404.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(os.path.dirname(HERE), "configs")


def host(i):
    return f"h{i}.example.com"


def fill(template, fields):
    with open(os.path.join(CONFIGS, template)) as f:
        text = f.read()
    for key, value in fields.items():
        text = text.replace(f"@{key}@", value)
    return text


def gatehouse(a, out):
    head = fill("gatehouse.toml.in", {"PORT": str(a.port), "BACKEND": a.backend, "ROUTES": ""})
    out.write(head)
    if a.hosts == 0:
        out.write('[[route]]\npath = "/"\nupstream = "app"\n')
        return
    for i in range(a.hosts):
        out.write(f'[[route]]\nhost = "{host(i)}"\npath = "/"\nupstream = "app"\n')


def nginx(a, out):
    if a.hosts == 0:
        names, default, extra = "        server_name _;", " default_server", ""
    else:
        lines = []
        for start in range(0, a.hosts, 500):
            chunk = " ".join(host(i) for i in range(start, min(start + 500, a.hosts)))
            lines.append(f"        server_name {chunk};")
        names, default = "\n".join(lines), ""
        extra = (f"    server {{\n        listen 127.0.0.1:{a.port} default_server;\n"
                 f"        return 404;\n    }}")
    out.write(fill("nginx.conf.in", {
        "PORT": str(a.port), "BACKEND": a.backend, "DIR": a.dir, "LOGDIR": a.logdir or a.dir,
        "DEFAULT_SERVER": default, "SERVER_NAMES": names, "EXTRA_SERVERS": extra,
    }))


def haproxy(a, out):
    rule = ""
    if a.hosts:
        mapfile = os.path.join(a.dir, f"haproxy-hosts-{a.hosts}.map")
        with open(mapfile, "w") as m:
            for i in range(a.hosts):
                m.write(f"{host(i)} app\n")
        rule = (f"    http-request deny deny_status 404 unless "
                f"{{ req.hdr(host),lower,map_str({mapfile}) -m found }}")
    out.write(fill("haproxy.cfg.in", {"PORT": str(a.port), "BACKEND": a.backend, "HOST_RULE": rule}))


def caddy(a, out):
    match = ""
    if a.hosts:
        match = '"match": [{"host": ' + json.dumps([host(i) for i in range(a.hosts)]) + "}],"
    out.write(fill("caddy.json.in", {"PORT": str(a.port), "BACKEND": a.backend, "HOST_MATCH": match}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("proxy", choices=["gatehouse", "nginx", "haproxy", "caddy"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--backend", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--logdir", help="where nginx writes its error log (default: --dir)")
    p.add_argument("--hosts", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    with open(a.out, "w", buffering=1 << 20) as out:
        globals()[a.proxy](a, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
