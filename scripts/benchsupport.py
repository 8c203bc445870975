"""Shared parts of the benchmark scripts: tiny Multiboot guests assembled at run time, and an
HTTP connection over the API's Unix socket."""
import http.client
import os
import socket
import subprocess

# The Multiboot v1 header (magic, flags: page-aligned modules and a memory map, checksum) and
# the 32-bit entry point `_start`; the guest's code follows.
MULTIBOOT_PROLOGUE = """
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003
        .text
        .code32
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)
        .globl _start
_start:
"""


def assemble_multiboot(body, directory, name="guest", definitions=""):
    """Assembles `definitions`, the Multiboot prologue and `body` (GNU as, 32-bit) and links it at
    1 MiB; returns the ELF kernel's path."""
    source = os.path.join(directory, name + ".S")
    with open(source, "w") as handle:
        handle.write(definitions + MULTIBOOT_PROLOGUE + body)
    subprocess.run(["as", "--32", "-o", source + ".o", source], check=True)
    kernel = os.path.join(directory, name + ".elf")
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x100000", "-o", kernel, source + ".o"], check=True)
    return kernel


class UnixHTTPConnection(http.client.HTTPConnection):
    """An HTTP/1.1 connection to a server on a Unix socket."""

    def __init__(self, path, timeout=None):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)
