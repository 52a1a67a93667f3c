/* mvm's vsock relay: the guest agent's AF_VSOCK listener (BusyBox cannot open AF_VSOCK).
 *
 *   vsock-relay <port> <in-fifo> <out-fifo>
 *   vsock-relay connect <cid> <port>      (a client, stdin/stdout: tests, debugging)
 *
 * Listens on vsock port <port> (any CID) and serves one connection at a time: opens
 * <in-fifo> for writing and <out-fifo> for reading (each open waits for the agent, which
 * opens them in the same order), copies the connection into <in-fifo> and <out-fifo> into
 * the connection, and when the host goes away closes <in-fifo> (the agent reads EOF, as on
 * virtio-serial) and copies <out-fifo> until the agent closes it. It dies with its parent
 * (the agent); on an error it cannot go on from it ends the agent too, whose init restarts
 * it. Built static by mvm.build.kernel and carried in mvm's initrd to /run/mvm.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static pid_t parent;

static void die(const char *what) {
	fprintf(stderr, "mvm-vsock-relay: %s: %s\n", what, strerror(errno));
	kill(parent, SIGTERM);
	exit(1);
}

static int write_all(int fd, const char *buf, size_t n) {
	while (n > 0) {
		ssize_t w = write(fd, buf, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += w;
		n -= (size_t)w;
	}
	return 0;
}

/* One connection: copy it into `in` and `out` into it. When the host stops sending (it
 * closed or half-closed the connection), `in` is closed, and the agent's answers to what
 * it read are still copied until it closes `out` (its end of this connection). */
static void serve(int conn, int in, int out) {
	static char buf[65536];
	struct pollfd fds[2] = {{.fd = conn, .events = POLLIN}, {.fd = out, .events = POLLIN}};
	int conn_ok = 1;
	for (;;) {
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (fds[0].fd >= 0 && fds[0].revents) {
			ssize_t n = read(conn, buf, sizeof buf);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0 || write_all(in, buf, (size_t)n) < 0) {
				close(in);
				in = -1;
				fds[0].fd = -1;
			}
		}
		if (fds[1].revents) {
			ssize_t n = read(out, buf, sizeof buf);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0)
				break;
			if (conn_ok && write_all(conn, buf, (size_t)n) < 0)
				conn_ok = 0; /* the host is gone: read the rest, for nobody */
		}
	}
	if (in >= 0)
		close(in);
	close(out);
	close(conn);
}

/* `connect <cid> <port>`: a client for tests and debugging: stdin to the port, the port to
 * stdout, until the other side closes. */
static int client(unsigned cid, unsigned port) {
	static char buf[65536];
	int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
	if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) < 0) {
		fprintf(stderr, "vsock-relay: connect %u:%u: %s\n", cid, port, strerror(errno));
		return 1;
	}
	struct pollfd fds[2] = {{.fd = 0, .events = POLLIN}, {.fd = s, .events = POLLIN}};
	for (;;) {
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		if (fds[0].fd >= 0 && fds[0].revents) {
			ssize_t n = read(0, buf, sizeof buf);
			if (n <= 0 || write_all(s, buf, (size_t)n) < 0) {
				shutdown(s, SHUT_WR);
				fds[0].fd = -1;
			}
		}
		if (fds[1].revents) {
			ssize_t n = read(s, buf, sizeof buf);
			if (n <= 0)
				return n < 0;
			if (write_all(1, buf, (size_t)n) < 0)
				return 1;
		}
	}
}

static int number(const char *s, unsigned *out) {
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || *s == '\0' || *end != '\0' || v > 0xffffffffUL)
		return -1;
	*out = (unsigned)v;
	return 0;
}

int main(int argc, char **argv) {
	unsigned port, cid;
	parent = getppid();
	signal(SIGPIPE, SIG_IGN);
	if (argc == 4 && strcmp(argv[1], "connect") == 0 && number(argv[2], &cid) == 0 &&
	    number(argv[3], &port) == 0)
		return client(cid, port);
	if (argc != 4 || number(argv[1], &port) < 0) {
		fprintf(stderr, "usage: vsock-relay <port> <in-fifo> <out-fifo>\n"
		                "       vsock-relay connect <cid> <port>\n");
		return 2;
	}
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	if (getppid() != parent)
		return 1;
	int s = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (s < 0)
		die("socket(AF_VSOCK)");
	struct sockaddr_vm addr = {.svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY,
	                           .svm_port = port};
	if (bind(s, (struct sockaddr *)&addr, sizeof addr) < 0)
		die("bind");
	if (listen(s, 4) < 0)
		die("listen");
	for (;;) {
		int conn = accept4(s, NULL, NULL, SOCK_CLOEXEC);
		if (conn < 0) {
			if (errno == EINTR || errno == ECONNABORTED || errno == EPROTO)
				continue;
			die("accept");
		}
		int in = open(argv[2], O_WRONLY | O_CLOEXEC); /* waits for the agent */
		if (in < 0)
			die(argv[2]);
		int out = open(argv[3], O_RDONLY | O_CLOEXEC);
		if (out < 0)
			die(argv[3]);
		serve(conn, in, out);
	}
}
