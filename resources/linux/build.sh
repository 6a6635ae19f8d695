#!/usr/bin/env bash
# Build the Linux guest used by Zygote's tests: a tiny 6.1 kernel as an ELF
# vmlinux (booted via its PVH note) plus a bzImage, and an uncompressed
# initramfs whose /init prints a marker and reboots. Facts behind every choice
# (what nested PVM cannot run, what costs seconds there): /work/shared/GUEST.md.
#
# Usage: resources/linux/build.sh
#   Outputs (outside the repo, reused while the inputs are unchanged):
#     ${ZYGOTE_CACHE:-$HOME/.cache/zygote}/linux/{vmlinux,bzImage,initramfs.cpio}
#     and, for reference, the kernel's final .config as linux/config
#   stdout carries only these lines, the last two always in this order:
#     BZIMAGE=/abs/path  VMLINUX=/abs/path  INITRAMFS=/abs/path
#   Progress goes to stderr, the kernel build's output to linux/build.log.
#
# Environment:
#   ZYGOTE_CACHE                cache root (default $HOME/.cache/zygote)
#   ZYGOTE_NESTED_PVM_PATCHES   1 (default) applies patches/*.patch, which a
#                               kernel needs only on a nested-PVM KVM host; 0
#                               builds the stock source
#   ZYGOTE_JOBS                 make -j (default: nproc)
#
# Caching: vmlinux.stamp holds a hash of this script, config.fragment, the
# patches and the patch switch; initramfs.stamp one of this script and
# init.c. Nothing else is hashed, so a cached build needs no packages at all;
# delete the cache directory to force a rebuild (e.g. after a Debian update
# of linux-source-6.1).
#
# Guest command line the outputs are meant for (see GUEST.md for each word):
#   console=ttyS0 reboot=k panic=-1 noxsave
#   clearcpuid=popcnt,rdrand,rdseed,fsgsbase,smap,invpcid,pcid,rdpid,pku,clflushopt,clwb,erms,fsrm
#   mitigations=off tsc=reliable rodata=off quiet
# (rodata=off skips mark_rodata_ro(), whose page-table rewrites and TLB
# flushes took 15-20 s of emulated CPL0 time here, far more on a busy host),
# (Zygote's ACPI tables describe the virtio-mmio devices; a VMM without them
# appends `virtio_mmio.device=SIZE@ADDR:IRQ` per device), and the init's mode
# words (init.c, net.c):
# `zygote_blk=1` prints `ZYGOTE-BLK <FNV-1a 64 of the first 4096 bytes of
# /dev/vda>` (blk_checksum.py computes the expected line on the host);
# `zygote_tick=MS [zygote_random=1]` prints the guest's clocks (and 32 bytes
# of /dev/urandom) every MS ms forever; `zygote_net=A.B.C.D/P`,
# `zygote_tcp_echo=PORT`, `zygote_vsock_echo=PORT` bring eth0 up and run
# echo servers.
# reboot=k polls port 0x64 for bit 1 clear before writing 0xFE there, up to
# 65536 emulated reads per try: the VMM should read 0x64 as 0.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${ZYGOTE_CACHE:-$HOME/.cache/zygote}/linux
PATCHES=${ZYGOTE_NESTED_PVM_PATCHES:-1}
JOBS=${ZYGOTE_JOBS:-$(nproc)}
KTAR=/usr/src/linux-source-6.1.tar.xz
KSRC_DIR=linux-source-6.1 # top directory inside $KTAR
DEPS=(build-essential flex bison bc libelf-dev libssl-dev xz-utils cpio patch linux-source-6.1)

# Keep stdout for the result lines only; everything else goes to stderr.
exec 3>&1 1>&2

log() { echo "linux/build.sh: $*"; }
die() {
	log "ERROR: $*"
	exit 1
}

[[ $PATCHES == 0 || $PATCHES == 1 ]] || die "ZYGOTE_NESTED_PVM_PATCHES must be 0 or 1"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$OUT/work
SRC=$WORK/$KSRC_DIR
LOG=$OUT/build.log

# Concurrent test runs may all call this script; one builds, the rest wait.
exec 9>"$OUT/.lock"
flock 9

publish() { # SRC DEST: replace atomically; tests may be reading DEST right now
	cp "$1" "$2.tmp"
	mv -f "$2.tmp" "$2"
}

hash_inputs() { # FILE... -> sha256 over names and contents
	local f
	for f in "$@"; do
		printf '%s\n' "${f#"$HERE"/}"
		cat "$f"
	done | sha256sum | cut -d' ' -f1
}

fresh() { # STAMP KEY OUTPUT... -> true if all outputs exist and STAMP == KEY
	local stamp=$1 key=$2 f
	shift 2
	for f in "$@"; do [[ -s $f ]] || return 1; done
	[[ -f $stamp && $(<"$stamp") == "$key" ]]
}

ensure_deps() {
	local missing=() p
	for p in "${DEPS[@]}"; do
		[[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) == "install ok installed" ]] ||
			missing+=("$p")
	done
	((${#missing[@]})) || return 0
	[[ $(id -u) == 0 ]] || die "missing Debian packages (run as root to install): ${missing[*]}"
	log "installing ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

kmake() {
	# Fixed build user/host/time so identical inputs give an identical banner.
	make -C "$SRC" ARCH=x86_64 -j"$JOBS" \
		KBUILD_BUILD_USER=zygote KBUILD_BUILD_HOST=zygote \
		KBUILD_BUILD_TIMESTAMP='Thu Jan  1 00:00:00 UTC 1970' \
		"$@" >>"$LOG" 2>&1 || {
		tail -n 40 "$LOG"
		die "make $* failed (full log: $LOG)"
	}
}

# Only for nested-PVM KVM hosts, where guest CPL0 code is emulated and some
# of it cannot be (GUEST.md, fixes 2, 5, 6, 8). --fuzz=0: a patch that no
# longer matches the source must fail, not land somewhere nearby.
apply_nested_pvm_patches() {
	local p
	for p in "$HERE"/patches/*.patch; do
		log "applying ${p#"$HERE"/}"
		patch -d "$SRC" -p1 --forward --batch --fuzz=0 --quiet <"$p" ||
			die "${p#"$HERE"/} does not apply to $KTAR"
	done
}

# tinyconfig keeps the guest small (every page first-touched costs ms under
# PVM); config.fragment adds what a virtio-mmio microVM guest needs.
configure_kernel() {
	local line opt bad=()
	kmake tinyconfig
	# Later assignments override earlier ones when Kconfig reads .config.
	cat "$HERE/config.fragment" >>"$SRC/.config"
	kmake olddefconfig
	# olddefconfig silently drops options whose dependencies are unmet.
	while IFS= read -r line; do
		if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
			grep -qxF "$line" "$SRC/.config" ||
				bad+=("$line (got: $(grep -m1 "^${BASH_REMATCH[1]}=" "$SRC/.config" || echo unset))")
		elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
			opt=${BASH_REMATCH[1]}
			! grep -q "^$opt=" "$SRC/.config" || bad+=("$opt off (got: $(grep -m1 "^$opt=" "$SRC/.config"))")
		fi
	done <"$HERE/config.fragment"
	((${#bad[@]} == 0)) || die "kernel config lost requested options: ${bad[*]}"
}

build_kernel() {
	log "unpacking $KTAR"
	rm -rf "$WORK"
	mkdir -p "$WORK"
	tar -xf "$KTAR" -C "$WORK"
	[[ -f $SRC/Makefile ]] || die "$KTAR has no $KSRC_DIR/ directory"
	if [[ $PATCHES == 1 ]]; then apply_nested_pvm_patches; fi
	configure_kernel
	log "building vmlinux and bzImage (make -j$JOBS, ~5 min on 2 idle cores; log: $LOG)"
	kmake vmlinux bzImage
	# The VMM boots vmlinux through its PVH entry; make sure it is there.
	readelf -n "$SRC/vmlinux" | grep -q 'Xen.*0x00000012' ||
		die "vmlinux lacks the PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY)"
	publish "$SRC/vmlinux" "$OUT/vmlinux"
	publish "$SRC/arch/x86/boot/bzImage" "$OUT/bzImage"
	publish "$SRC/.config" "$OUT/config" # the tree is deleted; keep it for reference
}

build_initramfs() {
	local w=$OUT/initramfs-work tool=$OUT/tools/gen_init_cpio
	rm -rf "$w"
	mkdir -p "$w" "$OUT/tools"
	# The kernel's own cpio writer, kept so that an init.c change does not
	# cost re-reading the 140 MB tarball (the newc format does not change).
	if [[ ! -x $tool ]]; then
		if [[ -f $SRC/usr/gen_init_cpio.c ]]; then
			cp "$SRC/usr/gen_init_cpio.c" "$w/"
		else
			tar -xOf "$KTAR" "$KSRC_DIR/usr/gen_init_cpio.c" >"$w/gen_init_cpio.c"
		fi
		gcc -O2 -o "$tool" "$w/gen_init_cpio.c"
	fi
	gcc -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie \
		-fno-asynchronous-unwind-tables -O2 -Wall -s -Wl,--build-id=none \
		-o "$w/init" "$HERE/init.c" "$HERE/net.c"
	touch -d @0 "$w/init" # cpio records file mtimes; keep output reproducible
	# /dev/console must exist for the kernel to give init fds 0-2: it does
	# not mount devtmpfs before running an initramfs /init.
	cat >"$w/list" <<-EOF
		dir /dev 0755 0 0
		nod /dev/console 0600 0 0 c 5 1
		file /init $w/init 0755 0 0
	EOF
	# Uncompressed: decompression is emulated CPL0 work under nested PVM.
	"$tool" -t 0 "$w/list" >"$w/initramfs.cpio"
	publish "$w/initramfs.cpio" "$OUT/initramfs.cpio"
	rm -rf "$w"
}

patch_files=()
if [[ $PATCHES == 1 ]]; then patch_files=("$HERE"/patches/*.patch); fi
KERNEL_KEY="patches=$PATCHES $(hash_inputs "$HERE/build.sh" "$HERE/config.fragment" "${patch_files[@]}")"
INITRAMFS_KEY=$(hash_inputs "$HERE/build.sh" "$HERE/init.c" "$HERE/net.c" "$HERE/sys.h")

kernel_ok=1 initramfs_ok=1
fresh "$OUT/vmlinux.stamp" "$KERNEL_KEY" "$OUT/vmlinux" "$OUT/bzImage" || kernel_ok=0
fresh "$OUT/initramfs.stamp" "$INITRAMFS_KEY" "$OUT/initramfs.cpio" || initramfs_ok=0

if ((!kernel_ok || !initramfs_ok)); then
	ensure_deps
	if ((!kernel_ok)); then
		: >"$LOG"
		rm -f "$OUT/vmlinux.stamp"
		SECONDS=0
		build_kernel
		echo "$KERNEL_KEY" >"$OUT/vmlinux.stamp"
		log "kernel built in ${SECONDS}s"
	fi
	if ((!initramfs_ok)); then
		rm -f "$OUT/initramfs.stamp"
		build_initramfs
		echo "$INITRAMFS_KEY" >"$OUT/initramfs.stamp"
	fi
	rm -rf "$WORK" # ~1.5 GiB of source and objects; the outputs are copied
else
	log "up to date in $OUT"
fi

echo "BZIMAGE=$OUT/bzImage" >&3
echo "VMLINUX=$OUT/vmlinux" >&3
echo "INITRAMFS=$OUT/initramfs.cpio" >&3
