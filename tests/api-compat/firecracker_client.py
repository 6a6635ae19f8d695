"""A published Firecracker client (PyPI hysn-firecracker-python, its `firecracker.api.Api`),
unchanged, drives Zygote: configure, boot, pause, snapshot create (Firecracker's body with
mem_file_path), then in a fresh server snapshot load (mem_backend File), resume, and the
restored guest reaches its init. The client treats any answer but Firecracker's (204 No
Content, 200 with the documented body) as an error, so every call below checks Zygote's
answers as Firecracker would be checked.

Usage: firecracker_client.py ZYGOTE_BIN VMLINUX INITRD WORKDIR
"""

import os
import subprocess
import sys
import time

from firecracker.api import Api

INIT_MARKER = "ZYGOTE-LINUX-INIT-OK"


def start(zygote, socket, log, *extra):
    out = open(log, "w")
    proc = subprocess.Popen([zygote, "run", "--api-sock", socket, *extra], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while not os.path.exists(socket):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"zygote did not serve {socket}: {open(log).read()}")
        time.sleep(0.05)
    return proc


def wait_for(log, needle, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if needle in open(log).read():
            return
        time.sleep(0.2)
    raise SystemExit(f"no {needle!r} in {log} after {timeout} s:\n{open(log).read()[-4000:]}")


def state(api):
    return api.describe.get().json()["state"]


def main():
    zygote, vmlinux, initrd, work = sys.argv[1:5]
    os.makedirs(work, exist_ok=True)
    first_sock, second_sock = os.path.join(work, "first.sock"), os.path.join(work, "second.sock")
    first_log, second_log = os.path.join(work, "first.log"), os.path.join(work, "second.log")
    state_file, mem_file = os.path.join(work, "vm.state"), os.path.join(work, "vm.mem")
    disk = os.path.join(work, "disk.img")
    with open(disk, "wb") as f:
        f.write(os.urandom(1 << 20))

    first = start(zygote, first_sock, first_log)
    try:
        api = Api(first_sock)
        assert state(api) == "Not started"
        print("version:", api.version.get().json())
        api.machine_config.put(vcpu_count=1, mem_size_mib=256, smt=False, track_dirty_pages=True)
        api.boot.put(kernel_image_path=vmlinux, initrd_path=initrd)
        api.drive.put(drive_id="data", path_on_host=disk, is_root_device=False, is_read_only=False)
        print("vm config:", api.vm_config.get().json())
        api.actions.put(action_type="InstanceStart")
        assert state(api) == "Running"
        api.vm.patch(state="Paused")
        assert state(api) == "Paused"
        api.create_snapshot.put(snapshot_type="Full", snapshot_path=state_file, mem_file_path=mem_file)
        api.vm.patch(state="Resumed")
        assert state(api) == "Running"
        api.close()
    finally:
        first.kill()
        first.wait()

    second = start(zygote, second_sock, second_log)
    try:
        api = Api(second_sock)
        api.load_snapshot.put(
            snapshot_path=state_file,
            mem_backend={"backend_type": "File", "backend_path": mem_file},
            enable_diff_snapshots=False,
            resume_vm=False,
        )
        assert state(api) == "Paused"
        api.vm.patch(state="Resumed")
        assert state(api) == "Running"
        # The restored guest boots on from the snapshot instant to its init.
        wait_for(second_log, INIT_MARKER, 300)
        api.close()
    finally:
        second.kill()
        second.wait()
    print("firecracker client: boot, pause, snapshot create, load and resume passed")


if __name__ == "__main__":
    main()
