"""Property-based API test: schemathesis generates requests from docs/openapi.yaml against a
running `zygote run --api-sock` and checks every answer: no 5xx, status codes, content types
and bodies as the spec says. Schemathesis speaks TCP: a small proxy forwards to the socket.

Operations that write files where a generated path points (snapshot create, logger, metrics)
or stop the server (the Shutdown action) are left out; everything else is exercised, against
an empty server (pre-boot configuration, snapshot load) and against a running tiny guest
(pause, clone, reset, the tree).

Usage: schemathesis_run.py ZYGOTE_BIN SPEC WORKDIR
"""

import os
import socket
import socketserver
import subprocess
import sys
import threading
import time


def forward(source, sink):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def proxy(unix_path):
    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(unix_path)
            back = threading.Thread(target=forward, args=(upstream, self.request), daemon=True)
            back.start()
            forward(self.request, upstream)
            back.join()

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def run(zygote, spec, work, name, guest_args, extra):
    sock = os.path.join(work, f"{name}.sock")
    log = open(os.path.join(work, f"{name}.log"), "w")
    proc = subprocess.Popen([zygote, "run", *guest_args, "--api-sock", sock], stdout=log, stderr=subprocess.STDOUT, cwd=work)
    try:
        deadline = time.time() + 20
        while not os.path.exists(sock):
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"zygote did not serve {sock}")
            time.sleep(0.05)
        port = proxy(sock)
        st = os.path.join(os.path.dirname(sys.executable), "st")
        cmd = [
            st, "run", spec, "--url", f"http://127.0.0.1:{port}",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--exclude-path", "/snapshot/create", "--exclude-path", "/logger", "--exclude-path", "/metrics",
            "--exclude-path", "/actions", "--seed", "1", "--request-timeout", "30", *extra,
        ]
        print("+", " ".join(cmd), flush=True)
        result = subprocess.run(cmd, cwd=work)
        if proc.poll() is not None:
            raise SystemExit(f"{name}: zygote exited during the run ({proc.returncode})")
        return result.returncode
    finally:
        proc.kill()
        proc.wait()


def main():
    zygote, spec, work = sys.argv[1:4]
    os.makedirs(work, exist_ok=True)
    failures = 0
    failures += run(zygote, spec, work, "empty", [], ["--max-examples", "50"]) != 0
    # Every clone runs a spinning guest: few examples, so the run stays small.
    failures += run(zygote, spec, work, "running", ["--guest", "spin", "--mem", "8"],
                    ["--max-examples", "5", "--include-path-regex", "^/(vm|vms|clone|reset)?$"]) != 0
    if failures:
        raise SystemExit("schemathesis found answers that break the spec or 5xx")
    print("schemathesis: no 5xx, no spec violation")


if __name__ == "__main__":
    main()
