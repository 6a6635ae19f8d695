/*
 * Networking modes of the test init (see init.c), for the virtio-net and
 * virtio-vsock tests:
 *   zygote_net=A.B.C.D/PREFIX  eth0 gets that IPv4 address and goes up:
 *     ZYGOTE-NET-UP eth0 A.B.C.D/PREFIX    or  ZYGOTE-NET-ERROR <step> <-errno>
 *   zygote_tcp_echo=PORT       a TCP server on PORT (any address) echoing
 *                              every byte back, one connection at a time:
 *     ZYGOTE-TCP-ECHO-LISTENING PORT       or  ZYGOTE-TCP-ECHO-ERROR <step> <-errno>
 *   zygote_vsock_echo=PORT     the same on AF_VSOCK port PORT (any CID):
 *     ZYGOTE-VSOCK-ECHO-LISTENING PORT     or  ZYGOTE-VSOCK-ECHO-ERROR <step> <-errno>
 * Each server is a forked process; a connection's end is logged as
 * ZYGOTE-<TCP|VSOCK>-ECHO-CLOSED <bytes echoed>.
 */

#include "sys.h"

#define AF_INET 2
#define AF_VSOCK 40
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define SOL_SOCKET 1
#define SO_REUSEADDR 2
#define SIOCGIFFLAGS 0x8913
#define SIOCSIFFLAGS 0x8914
#define SIOCSIFADDR 0x8916
#define SIOCSIFNETMASK 0x891c
#define IFF_UP 0x1
#define VMADDR_CID_ANY 0xffffffffU

struct sockaddr_in {
	u16 family;
	u16 port; /* network byte order */
	u32 addr; /* network byte order */
	u8 zero[8];
};

struct sockaddr_vm {
	u16 family;
	u16 reserved1;
	u32 port;
	u32 cid;
	u8 flags;
	u8 zero[3];
};

struct ifreq {
	char name[16];
	union {
		struct sockaddr_in addr;
		short flags;
		u8 pad[24];
	} u;
};

static u16 be16(u16 v)
{
	return (u16)((v << 8) | (v >> 8));
}

/* "A.B.C.D/P" -> address in network byte order and prefix; 0 if malformed. */
static int parse_cidr(const char *s, u32 *addr, long *prefix)
{
	u8 *b = (u8 *)addr;

	for (int i = 0; i < 4; i++) {
		long v = parse_dec(s, &s);

		if (v < 0 || v > 255 || *s != (i < 3 ? '.' : '/'))
			return 0;
		b[i] = (u8)v;
		s++;
	}
	*prefix = parse_dec(s, &s);
	return *prefix >= 0 && *prefix <= 32 && *s == 0;
}

static long ifreq_ioctl(long fd, long request, struct ifreq *req)
{
	static const char eth0[] = "eth0";

	for (u64 i = 0; i < sizeof(req->name); i++)
		req->name[i] = i < sizeof(eth0) ? eth0[i] : 0;
	return sys6(SYS_ioctl, fd, request, (long)req, 0, 0);
}

static void net_up(const char *cidr)
{
	struct ifreq req = { .name = { 0 } };
	struct line l = { .n = 0 };
	u32 addr, mask;
	long prefix, fd, r;

	if (!parse_cidr(cidr, &addr, &prefix))
		return say("ZYGOTE-NET-ERROR parse", -22);
	fd = sys6(SYS_socket, AF_INET, SOCK_DGRAM, 0, 0, 0);
	if (fd < 0)
		return say("ZYGOTE-NET-ERROR socket", fd);
	mask = prefix ? ~0U << (32 - prefix) : 0;
	mask = (mask >> 24) | ((mask >> 8) & 0xff00) | ((mask << 8) & 0xff0000) | (mask << 24);
	req.u.addr = (struct sockaddr_in){ .family = AF_INET, .addr = addr };
	if ((r = ifreq_ioctl(fd, SIOCSIFADDR, &req)) < 0)
		return say("ZYGOTE-NET-ERROR SIOCSIFADDR", r);
	req.u.addr = (struct sockaddr_in){ .family = AF_INET, .addr = mask };
	if ((r = ifreq_ioctl(fd, SIOCSIFNETMASK, &req)) < 0)
		return say("ZYGOTE-NET-ERROR SIOCSIFNETMASK", r);
	if ((r = ifreq_ioctl(fd, SIOCGIFFLAGS, &req)) < 0)
		return say("ZYGOTE-NET-ERROR SIOCGIFFLAGS", r);
	req.u.flags |= IFF_UP;
	if ((r = ifreq_ioctl(fd, SIOCSIFFLAGS, &req)) < 0)
		return say("ZYGOTE-NET-ERROR SIOCSIFFLAGS", r);
	sys6(SYS_close, fd, 0, 0, 0, 0);
	add(&l, "ZYGOTE-NET-UP eth0 ");
	add(&l, cidr);
	emit(&l);
}

static u8 echo_buf[4096];

/* "<name><what> <n>" as one line. */
static void report(const char *name, const char *what, long n)
{
	struct line l = { .n = 0 };

	add(&l, name);
	add(&l, what);
	add_dec(&l, n);
	emit(&l);
}

/* Serves connections on listening socket `fd` one at a time, forever. */
static void echo_forever(long fd, const char *name)
{
	for (;;) {
		long conn = sys6(SYS_accept, fd, 0, 0, 0, 0), total = 0, n;

		if (conn < 0)
			continue;
		while ((n = sys6(SYS_read, conn, (long)echo_buf, sizeof(echo_buf), 0, 0)) > 0) {
			for (long done = 0, w; done < n; done += w)
				if ((w = sys6(SYS_write, conn, (long)(echo_buf + done), n - done, 0, 0)) <= 0)
					goto closed;
			total += n;
		}
closed:
		sys6(SYS_close, conn, 0, 0, 0, 0);
		report(name, "-CLOSED ", total);
	}
}

/*
 * Binds a stream socket of `family` to `addr`, listens and forks a server on
 * it. Returns 1 once the child runs, 0 (after an error line) if not.
 */
static int serve(const char *name, long family, const void *addr, long addr_len, long port)
{
	const char *step;
	long fd, r, one = 1;

	if ((r = fd = sys6(SYS_socket, family, SOCK_STREAM, 0, 0, 0)) < 0) {
		step = "-ERROR socket ";
		goto fail;
	}
	sys6(SYS_setsockopt, fd, SOL_SOCKET, SO_REUSEADDR, (long)&one, sizeof(one));
	if ((r = sys6(SYS_bind, fd, (long)addr, addr_len, 0, 0)) < 0) {
		step = "-ERROR bind ";
		goto fail;
	}
	if ((r = sys6(SYS_listen, fd, 16, 0, 0, 0)) < 0) {
		step = "-ERROR listen ";
		goto fail;
	}
	report(name, "-LISTENING ", port);
	r = sys6(SYS_fork, 0, 0, 0, 0, 0);
	if (r == 0)
		echo_forever(fd, name);
	sys6(SYS_close, fd, 0, 0, 0, 0);
	if (r > 0)
		return 1;
	step = "-ERROR fork ";
fail:
	report(name, step, r);
	return 0;
}

int start_net(char **envp)
{
	const char *v;
	int servers = 0;
	long port;

	for (char **e = envp; *e; e++)
		if (starts(*e, "zygote_net=", &v))
			net_up(v);
	for (char **e = envp; *e; e++) {
		if (starts(*e, "zygote_tcp_echo=", &v) && (port = parse_dec(v, 0)) > 0 && port < 65536) {
			struct sockaddr_in a = { .family = AF_INET, .port = be16((u16)port) };

			servers += serve("ZYGOTE-TCP-ECHO", AF_INET, &a, sizeof(a), port);
		}
		if (starts(*e, "zygote_vsock_echo=", &v) && (port = parse_dec(v, 0)) > 0) {
			struct sockaddr_vm a = { .family = AF_VSOCK, .port = (u32)port, .cid = VMADDR_CID_ANY };

			servers += serve("ZYGOTE-VSOCK-ECHO", AF_VSOCK, &a, sizeof(a), port);
		}
	}
	return servers;
}
