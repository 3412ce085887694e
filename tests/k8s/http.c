/* A tiny HTTP/1.0 server and client for the k8s end-to-end script, built with
 * `gcc -static` so the workload image is this one file.
 *
 *   http serve [PORT]          answers every request with
 *                              "<name> <Host> <path> on <node> from <client>\n":
 *                              <name> is $POD_NAME (else the hostname), <node>
 *                              $NODE_NAME (else "-"), <path> the request's as
 *                              it arrived, <client> the source address seen;
 *                              one process, one connection at a time.
 *   http get IP PORT [HOST] [PATH]
 *                              one GET; prints the body; exits 0 on 200, 1
 *                              otherwise (3 s timeout for connect and read).
 *   http loop IP PORT [HOST] [PATH]
 *                              the same GET again and again, 50 ms apart,
 *                              until its standard input ends; prints the
 *                              first successful answer's body as soon as it
 *                              comes, and at the end "<ok> <failed>" (each
 *                              failure's reason goes to stderr as it happens).
 *   http addrs                 prints every address of every interface of the
 *                              network namespace it runs in, one
 *                              "<ifname> <address>/<prefix length>" line each.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <ifaddrs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "http: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int write_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* The value of the Host header in REQ, or "-". */
static void host_of(const char *req, char *out, size_t cap) {
    const char *h = strcasestr(req, "\r\nHost:");
    snprintf(out, cap, "-");
    if (!h)
        return;
    h += 7;
    while (*h == ' ')
        h++;
    size_t n = strcspn(h, "\r\n");
    if (n >= cap)
        n = cap - 1;
    memcpy(out, h, n);
    out[n] = 0;
}

/* The target of REQ's request line ("GET /x HTTP/1.0"), or "-". */
static void path_of(const char *req, char *out, size_t cap) {
    const char *p = strchr(req, ' ');
    snprintf(out, cap, "-");
    if (!p)
        return;
    p++;
    size_t n = strcspn(p, " \r\n");
    if (n == 0)
        return;
    if (n >= cap)
        n = cap - 1;
    memcpy(out, p, n);
    out[n] = 0;
}

/* The peer address of connected socket C as text; an IPv4-mapped IPv6
 * address (the server's one socket takes both families) as plain IPv4. */
static void peer_of(int c, char *out, size_t cap) {
    struct sockaddr_in6 a;
    socklen_t alen = sizeof a;
    snprintf(out, cap, "-");
    if (getpeername(c, (struct sockaddr *)&a, &alen) != 0 || a.sin6_family != AF_INET6)
        return;
    if (IN6_IS_ADDR_V4MAPPED(&a.sin6_addr))
        inet_ntop(AF_INET, &a.sin6_addr.s6_addr[12], out, cap);
    else
        inet_ntop(AF_INET6, &a.sin6_addr, out, cap);
}

static _Noreturn void serve(int port) {
    char name[256];
    const char *node = getenv("NODE_NAME");
    if (!node || !*node)
        node = "-";
    const char *pod = getenv("POD_NAME");
    if (pod && *pod)
        snprintf(name, sizeof name, "%s", pod);
    else if (gethostname(name, sizeof name) != 0)
        snprintf(name, sizeof name, "unknown");
    signal(SIGPIPE, SIG_IGN);
    /* One socket for both families: IPv6 with IPv4-mapped addresses. */
    int s = socket(AF_INET6, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    int one = 1, zero = 0;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons(port), .sin6_addr = IN6ADDR_ANY_INIT};
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0)
        die("bind");
    if (listen(s, 128) != 0)
        die("listen");
    fprintf(stderr, "http: %s serving on :%d\n", name, port);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            die("accept");
        }
        struct timeval tv = {.tv_sec = 3};
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char req[4096];
        size_t got = 0;
        /* Read up to the end of the headers (or a full buffer). */
        while (got < sizeof req - 1) {
            ssize_t n = read(c, req + got, sizeof req - 1 - got);
            if (n <= 0)
                break;
            got += (size_t)n;
            req[got] = 0;
            if (strstr(req, "\r\n\r\n"))
                break;
        }
        req[got] = 0;
        char host[256], path[256], peer[INET6_ADDRSTRLEN], body[1200], resp[1400];
        host_of(req, host, sizeof host);
        path_of(req, path, sizeof path);
        peer_of(c, peer, sizeof peer);
        int blen = snprintf(body, sizeof body, "%s %s %s on %s from %s\n", name, host, path, node, peer);
        int rlen = snprintf(resp, sizeof resp,
                            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                            "Connection: close\r\n\r\n%s",
                            blen, body);
        write_all(c, resp, (size_t)rlen);
        close(c);
    }
}

/* One GET of PATH with Host HOST from IP:PORT; the body goes to OUT unless
 * it is NULL. Returns 0 on 200, 1 on any failure (said on stderr), 2 on an
 * IP that is not an address. */
static int get(const char *ip, int port, const char *host, const char *path, FILE *out) {
    struct sockaddr_in a4 = {.sin_family = AF_INET, .sin_port = htons(port)};
    struct sockaddr_in6 a6 = {.sin6_family = AF_INET6, .sin6_port = htons(port)};
    struct sockaddr *a;
    socklen_t alen;
    if (inet_pton(AF_INET, ip, &a4.sin_addr) == 1) {
        a = (struct sockaddr *)&a4;
        alen = sizeof a4;
    } else if (inet_pton(AF_INET6, ip, &a6.sin6_addr) == 1) {
        a = (struct sockaddr *)&a6;
        alen = sizeof a6;
    } else {
        fprintf(stderr, "http: %s: not an IPv4 or IPv6 address\n", ip);
        return 2;
    }
    int s = socket(a->sa_family, SOCK_STREAM, 0);
    if (s < 0)
        die("socket");
    struct timeval tv = {.tv_sec = 3};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int rc = 1;
    if (connect(s, a, alen) != 0) {
        fprintf(stderr, "http: connect %s:%d: %s\n", ip, port, strerror(errno));
        goto out;
    }
    char req[512];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.0\r\nHost: %s\r\n\r\n", path, host);
    if (write_all(s, req, (size_t)n) != 0) {
        fprintf(stderr, "http: write %s:%d: %s\n", ip, port, strerror(errno));
        goto out;
    }
    char resp[8192];
    size_t got = 0;
    for (;;) {
        ssize_t r = read(s, resp + got, sizeof resp - 1 - got);
        if (r < 0) {
            fprintf(stderr, "http: read %s:%d: %s\n", ip, port, strerror(errno));
            goto out;
        }
        if (r == 0 || got + (size_t)r >= sizeof resp - 1) {
            got += (size_t)r;
            break;
        }
        got += (size_t)r;
    }
    resp[got] = 0;
    const char *body = strstr(resp, "\r\n\r\n");
    if (strncmp(resp, "HTTP/1.0 200", 12) != 0 && strncmp(resp, "HTTP/1.1 200", 12) != 0) {
        if (out)
            fputs(body ? body + 4 : resp, out);
        fprintf(stderr, "http: %s:%d: %.*s\n", ip, port, (int)strcspn(resp, "\r\n"), got ? resp : "(no answer)");
        goto out;
    }
    if (out) {
        fputs(body ? body + 4 : resp, out);
        fflush(out);
    }
    rc = 0;
out:
    close(s);
    return rc;
}

/* GETs until standard input ends (or fails), 50 ms apart; prints the counts. */
static int loop(const char *ip, int port, const char *host, const char *path) {
    unsigned long ok = 0, failed = 0;
    for (;;) {
        int rc = get(ip, port, host, path, ok == 0 ? stdout : NULL);
        if (rc == 2)
            return 2;
        if (rc == 0)
            ok++;
        else
            failed++;
        struct pollfd p = {.fd = 0, .events = POLLIN};
        int n = poll(&p, 1, 50);
        if (n < 0 && errno != EINTR)
            die("poll");
        if (n > 0) {
            char buf[256];
            if (read(0, buf, sizeof buf) <= 0)
                break;
        }
    }
    printf("%lu %lu\n", ok, failed);
    return 0;
}

/* The prefix length of a netmask (a contiguous one: what the kernel reports). */
static int prefix_len(const unsigned char *mask, size_t len) {
    int n = 0;
    for (size_t i = 0; i < len; i++)
        n += __builtin_popcount(mask[i]);
    return n;
}

static int addrs(void) {
    struct ifaddrs *all;
    if (getifaddrs(&all) != 0)
        die("getifaddrs");
    for (struct ifaddrs *i = all; i; i = i->ifa_next) {
        if (!i->ifa_addr || !i->ifa_netmask)
            continue;
        char text[INET6_ADDRSTRLEN];
        int plen;
        if (i->ifa_addr->sa_family == AF_INET) {
            inet_ntop(AF_INET, &((struct sockaddr_in *)i->ifa_addr)->sin_addr, text, sizeof text);
            plen = prefix_len((unsigned char *)&((struct sockaddr_in *)i->ifa_netmask)->sin_addr, 4);
        } else if (i->ifa_addr->sa_family == AF_INET6) {
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)i->ifa_addr)->sin6_addr, text, sizeof text);
            plen = prefix_len((unsigned char *)&((struct sockaddr_in6 *)i->ifa_netmask)->sin6_addr, 16);
        } else {
            continue;
        }
        printf("%s %s/%d\n", i->ifa_name, text, plen);
    }
    freeifaddrs(all);
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "serve") == 0)
        serve(argc >= 3 ? atoi(argv[2]) : 8080);
    if (argc >= 4 && strcmp(argv[1], "get") == 0)
        return get(argv[2], atoi(argv[3]), argc >= 5 ? argv[4] : argv[2], argc >= 6 ? argv[5] : "/", stdout);
    if (argc >= 4 && strcmp(argv[1], "loop") == 0)
        return loop(argv[2], atoi(argv[3]), argc >= 5 ? argv[4] : argv[2], argc >= 6 ? argv[5] : "/");
    if (argc == 2 && strcmp(argv[1], "addrs") == 0)
        return addrs();
    fprintf(stderr, "usage: http serve [PORT] | http get IP PORT [HOST] [PATH] | http loop IP PORT [HOST] [PATH] | http addrs\n");
    return 2;
}
