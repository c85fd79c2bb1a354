/* tamarco.c.log_udp: logstash records as UDP datagrams, sent in batches.
 *
 * The logstash sink encodes each record straight into a batch buffer here,
 * around the parts of the layout every record shares (encoded once, when
 * the sender is opened);
 * a full batch (64 datagrams) goes out in one sendmmsg(2), a partial one at
 * the end of the loop turn (the sink's flush). The socket is non-blocking:
 * a datagram the kernel cannot take now (EAGAIN, ENOBUFS) is dropped and
 * counted, never waited for, as UDP logging accepts. The socket is
 * connected to logstash (no address work per datagram); while nobody
 * listens the kernel reports "connection refused" once per ICMP answer,
 * which flush() returns as its message, and sending goes on. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE   /* sendmmsg */
#endif
#include "host.h"
#include "log_encode.h"
#include "lua_class.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define SENDER_MT "tamarco.log.udp"
#define BATCH 64

typedef struct udp_sender {
    int fd;
    struct sockaddr_storage addr;
    socklen_t addr_len;
    tamarco_buf data;    /* the batch's datagrams, back to back */
    size_t ends[BATCH];      /* end offset of each datagram in data */
    int count;
    int last_errno;          /* of the last failed send other than EAGAIN */
    int connected;           /* connect(2)ed to addr: no address per datagram */
    tamarco_logstash_layout layout;
} udp_sender;

static udp_sender *check_sender(lua_State *L)
{
    return luaL_checkudata(L, 1, SENDER_MT);
}

/* open(ip, port, version, host, message_type[, tags]) -> sender | nil, message
 * ip is numeric (v4 or v6). The rest is the logstash layout of every record
 * (see encode_logstash): version 0 or 1, the host and type written in each,
 * and the sink's own tags when a table (taken now: a later change of the
 * table does not show). */
static int l_open(lua_State *L)
{
    const char *ip = luaL_checkstring(L, 1);
    int port = luaL_checkint(L, 2);
    luaL_argcheck(L, port > 0 && port < 65536, 2, "port must be in 1..65535");
    int version = luaL_checkint(L, 3);
    luaL_argcheck(L, version == 0 || version == 1, 3, "logstash version must be 0 or 1");
    size_t host_len, type_len;
    const char *host = luaL_checklstring(L, 4, &host_len);
    const char *type = luaL_checklstring(L, 5, &type_len);
    udp_sender *s = lua_newuserdata(L, sizeof *s);
    memset(s, 0, sizeof *s);
    s->fd = -1;
    tamarco_buf_init(&s->data);
    tamarco_logstash_layout_init(&s->layout);
    luaL_getmetatable(L, SENDER_MT);
    lua_setmetatable(L, -2);
    if (!tamarco_logstash_layout_set(&s->layout, L, version, host, host_len, type, type_len,
                                     lua_istable(L, 6) ? 6 : 0))
        return luaL_error(L, "udp: out of memory");

    struct sockaddr_in *v4 = (struct sockaddr_in *)&s->addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&s->addr;
    if (inet_pton(AF_INET, ip, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)port);
        s->addr_len = sizeof *v4;
    } else if (inet_pton(AF_INET6, ip, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)port);
        s->addr_len = sizeof *v6;
    } else {
        lua_pushnil(L);
        lua_pushfstring(L, "udp: %s is not a numeric IP address", ip);
        return 2;
    }
    s->fd = socket(s->addr.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "udp: socket: %s", strerror(errno));
        return 2;
    }
    /* A connected UDP socket spares the kernel the route and address work of
     * every datagram; where connect fails, each datagram carries the address. */
    s->connected = connect(s->fd, (struct sockaddr *)&s->addr, s->addr_len) == 0;
    return 1;
}

/* Sends the batch; returns how many datagrams were dropped. */
static int send_batch(udp_sender *s)
{
    int dropped = 0, i = 0, refused = 0;
    struct mmsghdr msgs[BATCH];
    struct iovec iov[BATCH];
    for (int k = 0; k < s->count; k++) {
        size_t start = k ? s->ends[k - 1] : 0;
        iov[k].iov_base = s->data.data + start;
        iov[k].iov_len = s->ends[k] - start;
        memset(&msgs[k], 0, sizeof msgs[k]);
        if (!s->connected) {
            msgs[k].msg_hdr.msg_name = &s->addr;
            msgs[k].msg_hdr.msg_namelen = s->addr_len;
        }
        msgs[k].msg_hdr.msg_iov = &iov[k];
        msgs[k].msg_hdr.msg_iovlen = 1;
    }
    while (i < s->count) {
        int r = sendmmsg(s->fd, msgs + i, (unsigned)(s->count - i), 0);
        if (r > 0) {
            i += r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && errno == ECONNREFUSED && !refused) {
            /* a connected socket reports an earlier datagram's ICMP "port
             * unreachable" once, on this send: note it, send the batch */
            refused = 1;
            s->last_errno = ECONNREFUSED;
        } else if (r < 0 && errno == EMSGSIZE) {
            dropped++;   /* this one record is too big for a datagram */
            i++;
            s->last_errno = EMSGSIZE;
        } else {
            /* EAGAIN/ENOBUFS: the kernel is full; else an error that the
             * rest of the batch would meet too. Drop, never wait. */
            if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOBUFS)
                s->last_errno = errno;
            dropped += s->count - i;
            break;
        }
    }
    s->count = 0;
    s->data.len = 0;
    if (s->data.cap > (1u << 20))   /* after huge records */
        tamarco_buf_free(&s->data);
    return dropped;
}

/* Adds the datagram encoded after the batch's last one; sends the batch
 * when full. Returns the datagrams lost in that send (0 mostly). */
static int commit_datagram(lua_State *L, udp_sender *s)
{
    if (s->data.oom) {
        s->data.oom = 0;
        s->data.len = s->count ? s->ends[s->count - 1] : 0;
        return luaL_error(L, "udp: out of memory while encoding a record");
    }
    s->ends[s->count++] = s->data.len;
    return s->count == BATCH ? send_batch(s) : 0;
}

/* The sender at 1, open, its batch buffer holding whole datagrams only (a
 * memory error may have unwound an earlier call halfway). */
static udp_sender *open_sender(lua_State *L)
{
    udp_sender *s = check_sender(L);
    if (s->fd < 0)
        luaL_error(L, "udp sender is closed");
    s->data.len = s->count ? s->ends[s->count - 1] : 0;
    return s;
}

/* sender:send_logstash(record) -> dropped
 * Encodes the record in the sender's layout into the batch; sends the batch
 * when full. dropped: datagrams lost in that send (0 mostly). */
static int l_send_logstash(lua_State *L)
{
    luaL_checktype(L, 2, LUA_TTABLE);
    udp_sender *s = open_sender(L);
    tamarco_log_logstash(&s->data, L, 2, &s->layout);
    lua_pushinteger(L, commit_datagram(L, s));
    return 1;
}

/* sender:send_parts(timestamp, level, logger, message, extra, source_path,
 *                   source_line, service_name, deploy_name,
 *                   service_instance_id) -> dropped | false
 * The same datagram as send_logstash for the record with those fields,
 * without its table (see log_encode.h); false, sending nothing, when the
 * parts need the record's table. */
static int l_send_parts(lua_State *L)
{
    udp_sender *s = open_sender(L);
    lua_settop(L, 11);
    if (!tamarco_log_logstash_parts(&s->data, L, 2, &s->layout)) {
        lua_pushboolean(L, 0);
        return 1;
    }
    lua_pushinteger(L, commit_datagram(L, s));
    return 1;
}

/* sender:flush() -> dropped, last error message | nil (then forgotten) */
static int l_flush(lua_State *L)
{
    udp_sender *s = check_sender(L);
    lua_pushinteger(L, s->fd >= 0 && s->count > 0 ? send_batch(s) : 0);
    if (s->last_errno) {
        lua_pushstring(L, strerror(s->last_errno));
        s->last_errno = 0;
        return 2;
    }
    return 1;
}

/* sender:close(), also the __gc: what is batched is sent first. */
static int l_close(lua_State *L)
{
    udp_sender *s = check_sender(L);
    if (s->fd >= 0) {
        if (s->count > 0)
            send_batch(s);
        close(s->fd);
        s->fd = -1;
    }
    tamarco_buf_free(&s->data);
    tamarco_logstash_layout_free(&s->layout);
    s->count = 0;
    return 0;
}

int luaopen_tamarco_c_log_udp(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"send_logstash", l_send_logstash},
        {"send_parts", l_send_parts},
        {"flush", l_flush},
        {"close", l_close},
        {NULL, NULL},
    };
    tamarco_class_register(L, SENDER_MT, methods, l_close, NULL);

    lua_newtable(L);
    lua_pushcfunction(L, l_open);
    lua_setfield(L, -2, "open");
    return 1;
}
