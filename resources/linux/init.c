/*
 * Zygote test init: the whole userspace of the test guest.
 *
 * Freestanding on purpose (no libc, raw syscalls): it is ~1 KiB, so the
 * guest touches very few pages, and each first touch of a page costs
 * milliseconds under nested PVM. Built by build.sh with
 *   gcc -static -nostdlib -ffreestanding -O2 ...
 *
 * Protocol, on stdout (fd 1 = /dev/console = the serial console):
 *   ZYGOTE-LINUX-INIT-OK            always, first
 *   ZYGOTE-BLK <16 hex digits>      only with `zygote_blk=1` on the kernel
 *                                   command line: FNV-1a 64 of the first
 *                                   4096 bytes of /dev/vda
 *                                   (blk_checksum.py computes the same)
 *   ZYGOTE-BLK-ERROR <what> <n>     instead, if that failed (n = -errno
 *                                   or the short byte count)
 * then waits until the console has sent every byte (tcdrain) and calls
 * reboot(RESTART); with `reboot=k` the kernel writes 0xFE to port 0x64,
 * which the VMM treats as "guest wants to exit".
 */

typedef unsigned long u64;
typedef unsigned char u8;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_ioctl 16
#define SYS_mknod 133
#define SYS_mount 165
#define SYS_reboot 169

#define TCSBRK 0x5409 /* with a non-zero argument: tcdrain(), no break */

#define O_RDONLY 0
#define O_WRONLY 1
#define S_IFBLK 0060000

static long sys6(long nr, long a, long b, long c, long d, long e)
{
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	long ret;

	__asm__ volatile("syscall"
			 : "=a"(ret)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return ret;
}

static u64 len(const char *s)
{
	u64 n = 0;

	while (s[n])
		n++;
	return n;
}

static int eq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static int out = 1;

static void puts_(const char *s)
{
	sys6(SYS_write, out, (long)s, len(s), 0, 0);
}

static void put_hex(u64 v, int digits)
{
	char buf[17];

	for (int i = digits - 1; i >= 0; i--, v >>= 4)
		buf[i] = "0123456789abcdef"[v & 15];
	buf[digits] = 0;
	puts_(buf);
}

static void put_dec(long v)
{
	char buf[24];
	int i = sizeof(buf) - 1;
	int neg = v < 0;
	u64 u = neg ? -(u64)v : (u64)v;

	buf[i] = 0;
	do
		buf[--i] = '0' + u % 10;
	while (u /= 10);
	if (neg)
		buf[--i] = '-';
	puts_(buf + i);
}

static void blk_error(const char *what, long n)
{
	puts_("ZYGOTE-BLK-ERROR ");
	puts_(what);
	puts_(" ");
	put_dec(n);
	puts_("\n");
}

static u8 sector[4096] __attribute__((aligned(4096)));

static void blk_check(void)
{
	long fd, got = 0, r;
	u64 h = 0xcbf29ce484222325UL; /* FNV-1a 64 offset basis */

	/*
	 * The kernel does not mount devtmpfs before an initramfs init, so
	 * mount it to get /dev/vda whatever major virtio-blk was given.
	 * Failure (e.g. already mounted) is fine if the node then exists.
	 */
	sys6(SYS_mount, (long)"devtmpfs", (long)"/dev", (long)"devtmpfs", 0, 0);
	fd = sys6(SYS_open, (long)"/dev/vda", O_RDONLY, 0, 0, 0);
	if (fd < 0) {
		/* Last resort: the usual dynamic major of the first disk. */
		sys6(SYS_mknod, (long)"/dev/vda", S_IFBLK | 0600, 254 << 8, 0, 0);
		fd = sys6(SYS_open, (long)"/dev/vda", O_RDONLY, 0, 0, 0);
	}
	if (fd < 0)
		return blk_error("open", fd);
	while (got < (long)sizeof(sector)) {
		r = sys6(SYS_read, fd, (long)(sector + got), sizeof(sector) - got, 0, 0);
		if (r < 0)
			return blk_error("read", r);
		if (r == 0)
			return blk_error("short-read", got);
		got += r;
	}
	for (long i = 0; i < got; i++)
		h = (h ^ sector[i]) * 0x100000001b3UL; /* FNV-1a 64 prime */
	puts_("ZYGOTE-BLK ");
	put_hex(h, 16);
	puts_("\n");
}

__attribute__((used)) static void start_c(long *sp)
{
	char **envp = (char **)(sp + 1 + sp[0] + 1); /* argc, argv..., NULL */
	int want_blk = 0;

	for (char **e = envp; *e; e++)
		if (eq(*e, "zygote_blk=1"))
			want_blk = 1;

	/* fd 1 is missing only if /dev/console was absent from the cpio. */
	if (sys6(SYS_write, out, (long)"", 0, 0, 0) < 0)
		out = sys6(SYS_open, (long)"/dev/console", O_WRONLY, 0, 0, 0);

	puts_("ZYGOTE-LINUX-INIT-OK\n");
	if (want_blk)
		blk_check();

	/*
	 * The serial driver sends tty output from its transmit interrupt;
	 * reboot does not wait for it, so on a busy host the lines above
	 * were lost. Wait until the UART has sent everything.
	 */
	sys6(SYS_ioctl, out, TCSBRK, 1, 0, 0);

	/* LINUX_REBOOT_MAGIC1, MAGIC2, LINUX_REBOOT_CMD_RESTART */
	sys6(SYS_reboot, 0xfee1dead, 672274793, 0x01234567, 0, 0);
	for (;;) /* not reached; exiting init would panic the kernel */
		;
}

/* The kernel enters with argc at (%rsp); give C an ABI-aligned stack. */
__asm__(".text\n"
	".global _start\n"
	"_start:\n"
	"	mov %rsp, %rdi\n"
	"	and $-16, %rsp\n"
	"	call start_c\n"
	"	hlt\n");
