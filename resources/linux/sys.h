/*
 * Raw system calls and console output for the freestanding test init
 * (init.c, net.c): no libc, so the guest touches very few pages.
 */
#ifndef ZYGOTE_INIT_SYS_H
#define ZYGOTE_INIT_SYS_H

typedef unsigned long u64;
typedef long s64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_ioctl 16
#define SYS_socket 41
#define SYS_accept 43
#define SYS_bind 49
#define SYS_listen 50
#define SYS_setsockopt 54
#define SYS_fork 57
#define SYS_exit 60
#define SYS_wait4 61
#define SYS_mkdir 83
#define SYS_mknod 133
#define SYS_mount 165
#define SYS_reboot 169
#define SYS_clock_gettime 228
#define SYS_clock_nanosleep 230

#define O_RDONLY 0
#define O_WRONLY 1

static inline long sys6(long nr, long a, long b, long c, long d, long e)
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

static inline u64 len(const char *s)
{
	u64 n = 0;

	while (s[n])
		n++;
	return n;
}

/* Whether `s` starts with `prefix`; if so, *rest points past it. */
static inline int starts(const char *s, const char *prefix, const char **rest)
{
	while (*prefix && *s == *prefix)
		s++, prefix++;
	if (*prefix)
		return 0;
	if (rest)
		*rest = s;
	return 1;
}

/* A decimal number at s (stops at the first non-digit); -1 if none. */
static inline long parse_dec(const char *s, const char **end)
{
	long v = 0;
	int any = 0;

	while (*s >= '0' && *s <= '9')
		v = v * 10 + (*s++ - '0'), any = 1;
	if (end)
		*end = s;
	return any ? v : -1;
}

/*
 * Output: one line is built in a buffer and written with one write(), so
 * lines of different processes (the echo servers are forked) never mix.
 */
struct line {
	char buf[256];
	u64 n;
};

static inline void add(struct line *l, const char *s)
{
	while (*s && l->n < sizeof(l->buf) - 1)
		l->buf[l->n++] = *s++;
}

static inline void add_hex(struct line *l, u64 v, int digits)
{
	for (int i = digits - 1; i >= 0; i--)
		if (l->n + i < sizeof(l->buf) - 1)
			l->buf[l->n + i] = "0123456789abcdef"[(v >> (4 * (digits - 1 - i))) & 15];
	l->n += digits;
	if (l->n > sizeof(l->buf) - 1)
		l->n = sizeof(l->buf) - 1;
}

static inline void add_dec(struct line *l, long v)
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
	add(l, buf + i);
}

extern int out;

static inline void emit(struct line *l)
{
	add(l, "\n");
	sys6(SYS_write, out, (long)l->buf, l->n, 0, 0);
	l->n = 0;
}

/* "<what> <n>" as one line, e.g. an error with its -errno. */
static inline void say(const char *what, long n)
{
	struct line l = { .n = 0 };

	add(&l, what);
	add(&l, " ");
	add_dec(&l, n);
	emit(&l);
}

/*
 * net.c: bring eth0 up and fork the echo servers the command line asks for;
 * returns how many servers run (init must then stay alive).
 */
int start_net(char **envp);

#endif
