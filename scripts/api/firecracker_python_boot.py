#!/usr/bin/env python3
"""Drives a Hostvisor API socket with firecracker-python's Api client (PyPI: firecracker-python)
through Firecracker's boot sequence, then pauses and resumes the microVM.

Usage: firecracker_python_boot.py SOCKET KERNEL INITRD BOOT_ARGS DISK
Prints one line per step; exits non-zero on the first failure."""
import json
import sys
import time

from firecracker.api import Api


def main():
    socket, kernel, initrd, boot_args, disk = sys.argv[1:6]
    api = Api(socket)
    info = api.describe.get().json()
    assert info["state"] == "Not started", info
    print("version", api.version.get().json()["firecracker_version"], flush=True)
    api.boot.put(kernel_image_path=kernel, initrd_path=initrd, boot_args=boot_args)
    api.drive.put(drive_id="data", path_on_host=disk, is_root_device=False, is_read_only=True)
    api.machine_config.put(vcpu_count=1, mem_size_mib=512)
    config = api.vm_config.get().json()
    assert config["machine-config"]["mem_size_mib"] == 512, config
    assert config["drives"][0]["drive_id"] == "data", config
    api.actions.put(action_type="InstanceStart")
    state = api.describe.get().json()["state"]
    assert state == "Running", state
    print("state", state, flush=True)
    # Wait until the test says the guest's shell is up (it touches the marker file).
    marker = socket + ".ready"
    deadline = time.time() + 600
    import os
    while not os.path.exists(marker):
        if time.time() > deadline:
            raise SystemExit("the guest did not come up")
        time.sleep(0.2)
    api.vm.patch(state="Paused")
    state = api.describe.get().json()["state"]
    assert state == "Paused", state
    print("state", state, flush=True)
    try:
        api.vm.patch(state="Paused")
        raise SystemExit("pausing a paused microVM was accepted")
    except Exception as error:  # firecracker.exceptions.APIError
        print("refused", str(error).split(":")[0], flush=True)
    time.sleep(1)
    api.vm.patch(state="Resumed")
    state = api.describe.get().json()["state"]
    assert state == "Running", state
    print("state", state, flush=True)
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main()
