#!/usr/bin/env python3
"""Print what the test init prints for `zygote_blk=1`, computed on the host.

The guest init (init.c) reads the first 4096 bytes of /dev/vda and prints
`ZYGOTE-BLK <hex>`: FNV-1a 64 (offset basis 0xcbf29ce484222325, prime
0x100000001b3; per byte: h ^= b; h = h * prime mod 2**64) as 16 lowercase
hex digits. A disk image shorter than 4096 bytes makes the guest print
`ZYGOTE-BLK-ERROR short-read N` instead.

Usage: blk_checksum.py DISK_IMAGE   ->   ZYGOTE-BLK 0123456789abcdef
"""
import sys


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        data = f.read(4096)
    if len(data) < 4096:
        sys.exit(f"{sys.argv[1]}: shorter than 4096 bytes")
    print(f"ZYGOTE-BLK {fnv1a64(data):016x}")
