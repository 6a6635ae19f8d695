/*
 * Zygote test init: the whole userspace of the test guest.
 *
 * Freestanding on purpose (no libc, raw syscalls, sys.h): it is a few KiB,
 * so the guest touches very few pages, and each first touch of a page costs
 * milliseconds under nested PVM. Built by build.sh with
 *   gcc -static -nostdlib -ffreestanding -O2 ... init.c net.c
 *
 * Modes, selected by words on the kernel command line (which reach init's
 * environment); lines go to stdout (fd 1 = /dev/console = the serial console):
 *   ZYGOTE-LINUX-INIT-OK            always, first
 *   zygote_blk=1:
 *   ZYGOTE-BLK <16 hex digits>      FNV-1a 64 of the first 4096 bytes of
 *                                   /dev/vda (blk_checksum.py computes it)
 *   ZYGOTE-BLK-ERROR <what> <n>     instead, if that failed (n = -errno
 *                                   or the short byte count)
 *   zygote_tick=MS (runs forever):
 *   ZYGOTE-CLOCKSOURCE <name>       the kernel's current clocksource
 *   ZYGOTE-TICK seq=N mono=NS real=NS gap=NS missed=K [rand=64 hex digits]
 *                                   every MS ms of CLOCK_MONOTONIC: the
 *                                   monotonic and real time (ns), how far
 *                                   monotonic time moved since the previous
 *                                   tick, how many whole periods the guest
 *                                   saw pass without waking (a clock jump
 *                                   shows as a large gap and missed > 0),
 *                                   and with zygote_random=1 32 bytes of
 *                                   /dev/urandom read right after waking
 *   zygote_net=A.B.C.D/PREFIX, zygote_tcp_echo=PORT, zygote_vsock_echo=PORT:
 *                                   see net.c (eth0 up, echo servers)
 * Without zygote_tick (and with no server running) init then waits until
 * the console has sent every byte (tcdrain) and calls reboot(RESTART); with
 * `reboot=k` the kernel writes 0xFE to port 0x64, which the VMM treats as
 * "guest wants to exit".
 */

#include "sys.h"

#define TCSBRK 0x5409 /* with a non-zero argument: tcdrain(), no break */
#define S_IFCHR 0020000
#define S_IFBLK 0060000
#define CLOCK_REALTIME 0
#define CLOCK_MONOTONIC 1
#define TIMER_ABSTIME 1
#define EINTR 4
#define NS_PER_S 1000000000L

int out = 1;

static void blk_error(const char *what, long n)
{
	struct line l = { .n = 0 };

	add(&l, "ZYGOTE-BLK-ERROR ");
	add(&l, what);
	add(&l, " ");
	add_dec(&l, n);
	emit(&l);
}

/*
 * The kernel does not mount devtmpfs before an initramfs init, so mount it
 * to get the device nodes. Failure (e.g. already mounted) is fine if the
 * nodes then exist.
 */
static void mount_dev(void)
{
	sys6(SYS_mount, (long)"devtmpfs", (long)"/dev", (long)"devtmpfs", 0, 0);
}

static u8 sector[4096] __attribute__((aligned(4096)));

static void blk_check(void)
{
	long fd, got = 0, r;
	u64 h = 0xcbf29ce484222325UL; /* FNV-1a 64 offset basis */
	struct line l = { .n = 0 };

	mount_dev();
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
	add(&l, "ZYGOTE-BLK ");
	add_hex(&l, h, 16);
	emit(&l);
}

struct timespec {
	long sec, nsec;
};

static long now_ns(int clock)
{
	struct timespec t = { 0, 0 };

	sys6(SYS_clock_gettime, clock, (long)&t, 0, 0, 0);
	return t.sec * NS_PER_S + t.nsec;
}

/* ZYGOTE-CLOCKSOURCE <name>: which clock the kernel's timekeeping reads. */
static void print_clocksource(void)
{
	static const char path[] = "/sys/devices/system/clocksource/clocksource0/current_clocksource";
	char name[32];
	struct line l = { .n = 0 };
	long fd, n;

	sys6(SYS_mkdir, (long)"/sys", 0555, 0, 0, 0);
	sys6(SYS_mount, (long)"sysfs", (long)"/sys", (long)"sysfs", 0, 0);
	fd = sys6(SYS_open, (long)path, O_RDONLY, 0, 0, 0);
	n = fd < 0 ? fd : sys6(SYS_read, fd, (long)name, sizeof(name) - 1, 0, 0);
	if (n < 0)
		return say("ZYGOTE-CLOCKSOURCE-ERROR", n);
	while (n > 0 && (name[n - 1] == '\n' || name[n - 1] == ' '))
		n--;
	name[n] = 0;
	add(&l, "ZYGOTE-CLOCKSOURCE ");
	add(&l, name);
	emit(&l);
	sys6(SYS_close, fd, 0, 0, 0, 0);
}

/* /dev/urandom, opened once: -errno if it cannot be. */
static long open_urandom(void)
{
	long fd;

	mount_dev();
	fd = sys6(SYS_open, (long)"/dev/urandom", O_RDONLY, 0, 0, 0);
	if (fd < 0) {
		sys6(SYS_mknod, (long)"/dev/urandom", S_IFCHR | 0444, (1 << 8) | 9, 0, 0);
		fd = sys6(SYS_open, (long)"/dev/urandom", O_RDONLY, 0, 0, 0);
	}
	return fd;
}

/*
 * Every `period_ms` of CLOCK_MONOTONIC, against absolute deadlines, so a
 * late wake-up is measured rather than hidden: `missed` counts the whole
 * periods that passed beyond the one slept, and the next deadline skips
 * them. Never returns.
 */
static void tick_loop(long period_ms, int want_random)
{
	long period = period_ms * 1000000L;
	long deadline = now_ns(CLOCK_MONOTONIC);
	long last = deadline, urandom = -1;
	u8 bytes[32];

	print_clocksource();
	if (want_random && (urandom = open_urandom()) < 0)
		say("ZYGOTE-RANDOM-ERROR open", urandom);
	for (u64 seq = 0;; seq++) {
		struct line l = { .n = 0 };
		struct timespec until;
		long mono, real, missed;

		deadline += period;
		until.sec = deadline / NS_PER_S;
		until.nsec = deadline % NS_PER_S;
		while (sys6(SYS_clock_nanosleep, CLOCK_MONOTONIC, TIMER_ABSTIME, (long)&until, 0, 0) == -EINTR)
			;
		mono = now_ns(CLOCK_MONOTONIC);
		real = now_ns(CLOCK_REALTIME);
		missed = (mono - deadline) / period;
		deadline += missed * period;
		add(&l, "ZYGOTE-TICK seq=");
		add_dec(&l, seq);
		add(&l, " mono=");
		add_dec(&l, mono);
		add(&l, " real=");
		add_dec(&l, real);
		add(&l, " gap=");
		add_dec(&l, mono - last);
		add(&l, " missed=");
		add_dec(&l, missed);
		if (urandom >= 0) {
			long got = sys6(SYS_read, urandom, (long)bytes, sizeof(bytes), 0, 0);

			add(&l, " rand=");
			for (long i = 0; i < got; i++)
				add_hex(&l, bytes[i], 2);
			if (got != sizeof(bytes)) {
				add(&l, " rand-error=");
				add_dec(&l, got);
			}
		}
		emit(&l);
		last = mono;
	}
}

__attribute__((used)) static void start_c(long *sp)
{
	char **envp = (char **)(sp + 1 + sp[0] + 1); /* argc, argv..., NULL */
	int want_blk = 0, want_random = 0;
	long tick_ms = 0;
	int servers;
	const char *v;

	for (char **e = envp; *e; e++) {
		if (starts(*e, "zygote_blk=1", 0))
			want_blk = 1;
		if (starts(*e, "zygote_random=1", 0))
			want_random = 1;
		if (starts(*e, "zygote_tick=", &v))
			tick_ms = parse_dec(v, 0);
	}

	/* fd 1 is missing only if /dev/console was absent from the cpio. */
	if (sys6(SYS_write, out, (long)"", 0, 0, 0) < 0)
		out = sys6(SYS_open, (long)"/dev/console", O_WRONLY, 0, 0, 0);

	sys6(SYS_write, out, (long)"ZYGOTE-LINUX-INIT-OK\n", 21, 0, 0);
	if (want_blk)
		blk_check();
	servers = start_net(envp);
	if (tick_ms > 0)
		tick_loop(tick_ms, want_random);
	while (servers > 0) /* init must outlive its servers; reap whatever ends */
		sys6(SYS_wait4, -1, 0, 0, 0, 0);

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
