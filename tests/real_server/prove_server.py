"""Prove that a server binary really serves on this machine: start it on a free 127.0.0.1 port,
wait until it answers, send one real chat completion, stop it. The setup scripts run this before
they cache a server, so a build that cannot run here (an instruction the CPU or its VM traps on)
is never cached, and whoever hits it is told what to try.

    python prove_server.py NAME LOG TIMEOUT_S -- CMD... {port} ...

`{port}` in CMD is replaced by the port. Exit 0 on a completion with text; otherwise 1 and one
line on stderr saying why. Standard library only (any python3).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
CRASH_ADVICE = {
    signal.SIGILL: (
        "Illegal instruction: the binary uses an instruction this CPU (or the VM it runs in) "
        "traps on. The pinned build leaves out AMX; if it still happens, rebuild for a generic "
        "x86-64 CPU with NANO_EVAL_LLAMA_NATIVE=0 bash tests/real_server/setup_llama_server.sh, "
        "or start llama-server with --no-repack"
    ),
    signal.SIGSEGV: "Segmentation fault",
    signal.SIGKILL: "killed (out of memory?)",
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url, timeout=5):
    try:
        with OPENER.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (OSError, ValueError):
        return None, b""


def died(name, proc):
    code = proc.returncode
    if code is not None and code < 0:
        sig = signal.Signals(-code)
        return f"{name} died of {sig.name}: {CRASH_ADVICE.get(sig, 'see its log')}"
    return f"{name} exited with code {code} before it served a completion"


def first_model(root):
    status, body = get(root + "/v1/models")
    if status != 200:
        return None
    return json.loads(body)["data"][0]["id"]


def complete(root, model):
    body = json.dumps({"model": model, "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "Say hi."}]}).encode()
    req = urllib.request.Request(root + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with OPENER.open(req, timeout=600) as r:
        out = json.load(r)
    return out["choices"][0]["message"]["content"], out.get("usage")


def prove(name, log_path, timeout, cmd):
    port = free_port()
    root = f"http://127.0.0.1:{port}"
    cmd = [c.replace("{port}", str(port)) for c in cmd]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        model = None
        while model is None:
            if proc.poll() is not None:
                return died(name, proc)
            if time.monotonic() > deadline:
                return f"{name} did not answer /v1/models within {timeout:.0f} s"
            time.sleep(1)
            health = get(root + "/health")[0]  # llama.cpp: 503 while loading; 404 where there is none
            model = first_model(root) if health in (200, 404) else None
        try:
            text, usage = complete(root, model)
        except (OSError, ValueError, KeyError, IndexError) as e:
            time.sleep(1)
            return died(name, proc) if proc.poll() is not None else f"{name}: no completion ({e})"
        if not text:
            return f"{name}: the completion came back empty"
        print(f"[prove_server] {name} serves {model}: {text!r} {usage}", file=sys.stderr)
        return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main(argv):
    if len(argv) < 5 or argv[3] != "--":
        sys.exit(__doc__)
    error = prove(argv[0], argv[1], float(argv[2]), argv[4:])
    if error:
        print(f"[prove_server] {error} (log: {argv[1]})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
