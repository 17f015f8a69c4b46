"""A stand-in for cluster DNS whose pod records appear some time after the pod does.

On a real cluster a pod's name under its headless Service (<pod>.<service>.<ns>.svc) resolves only
once the pod has an IP, the EndpointSlice lists it and CoreDNS has picked it up: seconds after the
pod exists. A lookup before that gets NXDOMAIN (EAI_NONAME from getaddrinfo).

The stand-in is a small shared library, loaded with LD_PRELOAD into a container's processes, that
wraps libc's getaddrinfo. Python's socket module and libtorch's TCPStore both resolve through it,
so both see the lag:

- a name ending in `.svc` or `.svc.cluster.local` (any case, optional trailing dot) resolves only
  once it is listed in the hosts file named by $DNS_STANDIN_HOSTS (`<ip> <name> [<name>...]` lines,
  read at every lookup), to that address; before, EAI_NONAME;
- every other name (localhost, the machine's hostname, numeric addresses) goes to the real
  getaddrinfo.

`ClusterDNS` owns the hosts file and the compiled library; the kubelet stand-in publishes a pod's
names `dns_delay` seconds after it saw the pod created. Needs gcc (present here and in CI).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
from pathlib import Path

HOSTS_ENV = "DNS_STANDIN_HOSTS"

SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <ctype.h>
#include <dlfcn.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef int (*getaddrinfo_fn)(const char *, const char *, const struct addrinfo *, struct addrinfo **);

static getaddrinfo_fn real_getaddrinfo;

__attribute__((constructor)) static void init(void) {
    real_getaddrinfo = (getaddrinfo_fn)dlsym(RTLD_NEXT, "getaddrinfo");
}

static int ends_with(const char *s, size_t n, const char *suffix) {
    size_t m = strlen(suffix);
    return n > m && strncmp(s + n - m, suffix, m) == 0;
}

/* Lower-cased `node` without a trailing dot, if it is a cluster name. */
static int cluster_name(const char *node, char *out, size_t size) {
    size_t n = strlen(node);
    if (n > 0 && node[n - 1] == '.') n--;
    if (n == 0 || n >= size) return 0;
    for (size_t i = 0; i < n; i++) out[i] = (char)tolower((unsigned char)node[i]);
    out[n] = '\0';
    return ends_with(out, n, ".svc") || ends_with(out, n, ".svc.cluster.local");
}

/* The published address of `name` (read afresh: the kubelet stand-in appends as pods appear). */
static int published(const char *name, char *ip, size_t size) {
    const char *path = getenv("DNS_STANDIN_HOSTS");
    FILE *f = path ? fopen(path, "r") : NULL;
    int found = 0;
    char line[4096];
    if (f == NULL) return 0;
    while (!found && fgets(line, sizeof line, f)) {
        char *save = NULL;
        char *addr = strtok_r(line, " \t\r\n", &save);
        if (addr == NULL || addr[0] == '#') continue;
        for (char *tok; (tok = strtok_r(NULL, " \t\r\n", &save)) != NULL;) {
            if (strcasecmp(tok, name) == 0 && strlen(addr) < size) {
                strcpy(ip, addr);
                found = 1;
                break;
            }
        }
    }
    fclose(f);
    return found;
}

int getaddrinfo(const char *node, const char *service, const struct addrinfo *hints, struct addrinfo **res) {
    char name[256], ip[64];
    if (node == NULL || !cluster_name(node, name, sizeof name))
        return real_getaddrinfo(node, service, hints, res);
    if (!published(name, ip, sizeof ip))
        return EAI_NONAME;
    struct addrinfo h;
    memset(&h, 0, sizeof h);
    if (hints) h = *hints;
    h.ai_flags |= AI_NUMERICHOST;
    int rc = real_getaddrinfo(ip, service, &h, res);
    if (rc == 0 && hints && (hints->ai_flags & AI_CANONNAME) && *res) {
        /* glibc's freeaddrinfo frees ai_canonname on its own */
        free((*res)->ai_canonname);
        (*res)->ai_canonname = strdup(name);
    }
    return rc;
}
"""


def build_shim(directory: Path) -> Path:
    """Compile the getaddrinfo wrapper into `directory` (once per source version); gcc must exist."""
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:12]
    lib = directory / f"libdns-standin-{digest}.so"
    if lib.exists():
        return lib
    directory.mkdir(parents=True, exist_ok=True)
    src = directory / f"dns-standin-{digest}.c"
    src.write_text(SHIM_SOURCE)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(tmp), str(src), "-ldl"],
        check=True,
        capture_output=True,
        text=True,
    )
    tmp.rename(lib)
    return lib


class ClusterDNS:
    """The records of one emulated cluster: a hosts file that the shim reads, and the shim itself."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.hosts = directory / "hosts"
        self.library = build_shim(directory)
        self.hosts.touch()
        self._lock = threading.Lock()

    def publish(self, names: list[str], ip: str = "127.0.0.1") -> None:
        """From now on every process using `env()` resolves `names` to `ip`."""
        with self._lock:  # a whole new file, renamed in: a lookup never reads half a line
            tmp = self.hosts.with_suffix(".tmp")
            tmp.write_text(self.hosts.read_text() + f"{ip} {' '.join(names)}\n")
            tmp.rename(self.hosts)

    def published(self) -> set[str]:
        return {n for line in self.hosts.read_text().splitlines() for n in line.split()[1:]}

    def env(self, inherited: dict[str, str] | None = None) -> dict[str, str]:
        """Environment that makes a process (and its children) resolve through this DNS."""
        preload = " ".join(p for p in (str(self.library), (inherited or {}).get("LD_PRELOAD", "")) if p)
        return {"LD_PRELOAD": preload, HOSTS_ENV: str(self.hosts)}


def pod_names(pod: dict) -> list[str]:
    """The DNS names a pod gets from its headless Service: <hostname>.<subdomain>.<ns>.svc[.cluster.local]."""
    spec, meta = pod.get("spec") or {}, pod["metadata"]
    if not spec.get("subdomain"):
        return []
    base = (
        f"{spec.get('hostname') or meta['name']}.{spec['subdomain']}.{meta.get('namespace', 'default')}.svc"
    )
    return [base, f"{base}.cluster.local"]
