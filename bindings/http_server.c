/*
 * tamarco.c.http_server: the Lua API of the HTTP server engine
 * (bindings/http_engine.{h,c}, which has the sockets, parser and limits).
 *
 * Bytes and syscalls live in the engine; routing, JSON, CORS and caching
 * live in lua/tamarco/resources/http_server.lua. This file turns requests
 * into tasks and handles, and Lua tables into response headers.
 *
 *   local hs = require "tamarco.c.http_server"
 *   local server, err, code = hs.listen({ host = "127.0.0.1", port = 8080 }, dispatch)
 *   -- dispatch(req, method, path, origin) runs in a new task for every
 *   -- complete request (path without the query; origin: the Origin header or nil)
 *   function dispatch(req, method, path, origin)
 *       req:respond(200, { ["x-a"] = "b" }, "body", "text/plain")
 *   end
 *   server:shutdown(5000)   -- yields: stop accepting, drain, close
 *
 * Besides the method, path and Origin every request is given, Lua strings
 * are only made when an accessor asks. A request handle (a
 * small userdata holding the struct and its generation) is always safe to
 * use: after respond() the generation moves on and the handle reports
 * "request already answered".
 */
#include "host.h"
#include "lua_class.h"
#include "lua_options.h"
#include "task_guard.h"
#include "http_engine.h"

#include <limits.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#define SERVER_MT "tamarco.http_server.server"
#define REQUEST_MT "tamarco.http_server.request"

/* What the Lua side keeps per server (hserver.user). */
typedef struct lua_server {
    tamarco_host *host;
    int dispatcher_ref, req_mt_ref;
    int drain_wait;       /* wait id of a task in shutdown(), 0 if none */
} lua_server;

typedef struct server_box {
    hserver *srv;
} server_box;

typedef struct req_handle {
    hreq *r;
    uint32_t gen;
} req_handle;

/* ---------------------------------------------------------------- engine callbacks */

static int push_header(lua_State *L, hreq *r, const char *name, size_t nlen);

static void on_request(hserver *srv, hreq *r)
{
    lua_server *ls = srv->user;
    tamarco_host *host = ls->host;
    lua_State *L = host->L;
    lua_rawgeti(L, LUA_REGISTRYINDEX, ls->dispatcher_ref);
    req_handle *h = lua_newuserdata(L, sizeof *h);
    h->r = r;
    h->gen = r->gen;
    lua_rawgeti(L, LUA_REGISTRYINDEX, ls->req_mt_ref);
    lua_setmetatable(L, -2);
    http_req_hold(r);
    /* what every request needs, given at once rather than asked for
     * by three calls back into C: method, path, Origin (for CORS) */
    const char *path, *query;
    size_t plen, qlen;
    http_req_split_url(r, &path, &plen, &query, &qlen);
    lua_pushstring(L, http_method_str((enum http_method)r->method));
    lua_pushlstring(L, path, plen);
    if (!push_header(L, r, "origin", 6))
        lua_pushnil(L);
    uint32_t gen = r->gen;
    if (tamarco_start_task(host, 4) != 0 && r->gen == gen) {
        /* the dispatcher itself failed (already logged): answer for it */
        http_respond_error(r, 500, "internal server error");
    }
}

static int push_drain_result(lua_State *co, void *ud)
{
    int timed_out = *(int *)ud;
    if (timed_out) {
        lua_pushnil(co);
        lua_pushliteral(co, "timeout");
        return 2;
    }
    lua_pushboolean(co, 1);
    return 1;
}

static void on_drained(hserver *srv, int timed_out)
{
    lua_server *ls = srv->user;
    if (ls->drain_wait) {
        int id = ls->drain_wait;
        ls->drain_wait = 0;
        tamarco_wake(ls->host, id, push_drain_result, &timed_out);
    }
}

/* Above this Lua heap (KiB) a full collection would stall the loop too
 * long: the incremental collector gets to the handles in its own time. */
#define BURST_GC_MAX_HEAP_KB (64 * 1024)

/* A burst is over: its request handles are garbage, and collecting them
 * lets the engine free (and give back) the request structs they kept. */
static void on_burst_end(hserver *srv)
{
    lua_server *ls = srv->user;
    lua_State *L = ls->host->L;
    if (L && lua_gc(L, LUA_GCCOUNT, 0) < BURST_GC_MAX_HEAP_KB)
        lua_gc(L, LUA_GCCOLLECT, 0);
}

static void on_free(hserver *srv)
{
    free(srv->user);
    srv->user = NULL;
}

static const http_engine_callbacks engine_callbacks = {
    .on_request = on_request,
    .on_drained = on_drained,
    .on_burst_end = on_burst_end,
    .on_free = on_free,
};

/* ---------------------------------------------------------------- request handle */

static hreq *check_req(lua_State *L)
{
    req_handle *h = lua_touserdata(L, 1);
    if (!h || !lua_getmetatable(L, 1) || !lua_rawequal(L, -1, lua_upvalueindex(1)))
        luaL_typerror(L, 1, "http request");
    lua_pop(L, 1);
    if (h->r->gen != h->gen)
        luaL_error(L, "request already answered");
    return h->r;
}

/* info() -> method, path (raw, without the query string) */
static int l_req_info(lua_State *L)
{
    hreq *r = check_req(L);
    const char *path, *query;
    size_t plen, qlen;
    http_req_split_url(r, &path, &plen, &query, &qlen);
    lua_pushstring(L, http_method_str((enum http_method)r->method));
    lua_pushlstring(L, path, plen);
    return 2;
}

static int l_req_method(lua_State *L)
{
    hreq *r = check_req(L);
    lua_pushstring(L, http_method_str((enum http_method)r->method));
    return 1;
}

static int l_req_url(lua_State *L)
{
    hreq *r = check_req(L);
    size_t len;
    const char *url = http_req_url(r, &len);
    lua_pushlstring(L, url, len);
    return 1;
}

/* query_string() -> the raw query string, or nil */
static int l_req_query_string(lua_State *L)
{
    hreq *r = check_req(L);
    const char *path, *query;
    size_t plen, qlen;
    http_req_split_url(r, &path, &plen, &query, &qlen);
    if (!query)
        return 0;
    lua_pushlstring(L, query, qlen);
    return 1;
}

/* Pushes the value of header `name` (case-insensitive; repeated fields
 * joined by ", ") and returns 1, or pushes nothing and returns 0. */
static int push_header(lua_State *L, hreq *r, const char *name, size_t nlen)
{
    int found = 0;
    luaL_Buffer b;
    for (int i = 0; i < r->nhdrs; i++) {
        hdr *h = &r->hdrs[i];
        if (!http_req_header_is(r, h, name, nlen))
            continue;
        if (found == 0) {
            lua_pushlstring(L, r->head.data + h->value_off, h->value_len);
        } else {
            if (found == 1) {
                luaL_buffinit(L, &b);
                lua_pushvalue(L, -1);
                luaL_addvalue(&b);
            }
            luaL_addlstring(&b, ", ", 2);
            luaL_addlstring(&b, r->head.data + h->value_off, h->value_len);
        }
        found++;
    }
    if (found > 1)
        luaL_pushresult(&b);
    return found ? 1 : 0;
}

/* header(name) -> value or nil; case-insensitive; repeated fields joined by ", " */
static int l_req_header(lua_State *L)
{
    hreq *r = check_req(L);
    size_t nlen;
    const char *name = luaL_checklstring(L, 2, &nlen);
    return push_header(L, r, name, nlen);
}

/* headers() -> { lowercased-name = value } (repeated fields joined by ", ") */
static int l_req_headers(lua_State *L)
{
    hreq *r = check_req(L);
    lua_createtable(L, 0, r->nhdrs);
    char name[256];
    for (int i = 0; i < r->nhdrs; i++) {
        hdr *h = &r->hdrs[i];
        const char *raw = r->head.data + h->name_off;
        if (h->name_len <= sizeof name) {
            for (size_t k = 0; k < h->name_len; k++)
                name[k] = (raw[k] >= 'A' && raw[k] <= 'Z') ? (char)(raw[k] + 32) : raw[k];
            lua_pushlstring(L, name, h->name_len);
        } else {
            /* long names (max_header_size bounds them) are kept whole */
            luaL_Buffer b;
            luaL_buffinit(L, &b);
            for (size_t k = 0; k < h->name_len; k++)
                luaL_addchar(&b, (raw[k] >= 'A' && raw[k] <= 'Z') ? (char)(raw[k] + 32) : raw[k]);
            luaL_pushresult(&b);
        }
        lua_pushvalue(L, -1);
        lua_rawget(L, -3);
        if (lua_isnil(L, -1)) {
            lua_pop(L, 1);
            lua_pushlstring(L, r->head.data + h->value_off, h->value_len);
        } else {
            lua_pushliteral(L, ", ");
            lua_pushlstring(L, r->head.data + h->value_off, h->value_len);
            lua_concat(L, 3);
        }
        lua_rawset(L, -3);
    }
    return 1;
}

static int l_req_body(lua_State *L)
{
    hreq *r = check_req(L);
    lua_pushlstring(L, r->body.data ? r->body.data : "", r->body.len);
    return 1;
}

static int l_req_keep_alive(lua_State *L)
{
    hreq *r = check_req(L);
    lua_pushboolean(L, r->keep_alive);
    return 1;
}

/* version() -> "1.1" / "1.0" */
static int l_req_version(lua_State *L)
{
    hreq *r = check_req(L);
    lua_pushfstring(L, "%d.%d", r->http_major, r->http_minor);
    return 1;
}

/* remote_address() -> ip, port or nil when the connection is gone */
/* Pushes a socket address as two values: ip, port. */
static int push_address(lua_State *L, const struct sockaddr_storage *ss)
{
    char ip[64];
    int port;
    if (ss->ss_family == AF_INET6) {
        uv_ip6_name((const struct sockaddr_in6 *)ss, ip, sizeof ip);
        port = ntohs(((const struct sockaddr_in6 *)ss)->sin6_port);
    } else {
        uv_ip4_name((const struct sockaddr_in *)ss, ip, sizeof ip);
        port = ntohs(((const struct sockaddr_in *)ss)->sin_port);
    }
    lua_pushstring(L, ip);
    lua_pushinteger(L, port);
    return 2;
}

static int l_req_remote_address(lua_State *L)
{
    hreq *r = check_req(L);
    if (!r->conn || r->conn->closing)
        return 0;
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if (uv_tcp_getpeername(&r->conn->tcp, (struct sockaddr *)&ss, &len) != 0)
        return 0;
    return push_address(L, &ss);
}

/* connected() -> false once the client went away (the response would be dropped) */
static int l_req_connected(lua_State *L)
{
    hreq *r = check_req(L);
    lua_pushboolean(L, http_req_connected(r));
    return 1;
}

/* Writes the user's headers from the table at `idx`; skips the ones the
 * engine owns (content-length, transfer-encoding, connection). */
static const char *put_user_headers(lua_State *L, int idx, tamarco_buf *b, resp_flags *fl)
{
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        if (lua_type(L, -2) != LUA_TSTRING) {
            lua_pop(L, 2);
            return "header names must be strings";
        }
        size_t nlen;
        const char *name = lua_tolstring(L, -2, &nlen);
        if (!http_valid_header_name(name, nlen)) {
            lua_pop(L, 2);
            return "invalid header name";
        }
        if (http_response_header_is_own(name, nlen)) {
            const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
            if (nlen == 10 && v && strcasecmp(v, "close") == 0)
                fl->wants_close = 1;
            lua_pop(L, 1);
            continue;
        }
        const char *err = NULL;
        int vt = lua_gettop(L);
        if (lua_type(L, vt) == LUA_TTABLE) {
            int n = (int)lua_objlen(L, vt);
            for (int i = 1; i <= n && !err; i++) {
                lua_rawgeti(L, vt, i);
                size_t vlen;
                const char *value = lua_type(L, -1) == LUA_TBOOLEAN ? NULL : lua_tolstring(L, -1, &vlen);
                err = value ? http_response_header(b, name, nlen, value, vlen, fl)
                            : "header values must be strings or numbers";
                lua_pop(L, 1);
            }
        } else {
            size_t vlen;
            const char *value = lua_type(L, vt) == LUA_TBOOLEAN ? NULL : lua_tolstring(L, vt, &vlen);
            err = value ? http_response_header(b, name, nlen, value, vlen, fl)
                        : "header values must be strings or numbers";
        }
        if (err) {
            lua_pop(L, 2);
            return err;
        }
        lua_pop(L, 1);
    }
    return NULL;
}

/* respond(status, headers|nil, body|nil, content_type|nil) -> true, or
 * false when the client is gone (the response is dropped). Raises on bad
 * arguments (bad status, header names/values with CR/LF) leaving the
 * request unanswered, so the caller can still answer with a 500. */
static int l_req_respond(lua_State *L)
{
    hreq *r = check_req(L);
    int status = luaL_checkint(L, 2);
    luaL_argcheck(L, status >= 100 && status <= 999, 2, "HTTP status must be 100..999");
    int has_headers = !lua_isnoneornil(L, 3);
    if (has_headers)
        luaL_checktype(L, 3, LUA_TTABLE);
    size_t blen = 0;
    const char *body = lua_isnoneornil(L, 4) ? "" : luaL_checklstring(L, 4, &blen);
    size_t ctlen = 0;
    const char *ctype = lua_isnoneornil(L, 5) ? NULL : luaL_checklstring(L, 5, &ctlen);
    tamarco_buf *b;
    size_t mark;
    int rc = http_response_begin(r, status, &b, &mark);
    if (rc == 1) {
        lua_pushboolean(L, 0);   /* the client is gone: dropped */
        return 1;
    }
    if (rc != 0)
        return luaL_error(L, "out of memory");
    resp_flags fl = {0, 0, 0, 0};
    if (has_headers) {
        const char *err = put_user_headers(L, 3, b, &fl);
        if (err) {
            http_response_cancel(b, mark);
            return luaL_error(L, "bad response header: %s", err);
        }
    }
    if (http_response_end(r, b, mark, status, &fl, body, blen, ctype, ctlen) != 0)
        return luaL_error(L, "out of memory");
    lua_pushboolean(L, 1);
    return 1;
}

static int l_req_gc(lua_State *L)
{
    req_handle *h = lua_touserdata(L, 1);
    http_req_release_hold(h->r);
    return 0;
}

static int l_req_tostring(lua_State *L)
{
    req_handle *h = lua_touserdata(L, 1);
    if (h->r->gen != h->gen) {
        lua_pushliteral(L, "http request (answered)");
        return 1;
    }
    size_t len;
    const char *url = http_req_url(h->r, &len);
    lua_pushfstring(L, "http request %s ", http_method_str((enum http_method)h->r->method));
    lua_pushlstring(L, url, len > 200 ? 200 : len);
    lua_concat(L, 2);
    return 1;
}

/* ---------------------------------------------------------------- server */

static hserver *check_server(lua_State *L)
{
    server_box *box = luaL_checkudata(L, 1, SERVER_MT);
    if (!box->srv)
        luaL_error(L, "the HTTP server is closed");
    return box->srv;
}

/* Closes every connection now and the server's handles; releases its
 * Lua references. */
static void server_close(lua_State *L, server_box *box)
{
    hserver *srv = box->srv;
    if (!srv)
        return;
    box->srv = NULL;
    lua_server *ls = srv->user;
    luaL_unref(L, LUA_REGISTRYINDEX, ls->dispatcher_ref);
    luaL_unref(L, LUA_REGISTRYINDEX, ls->req_mt_ref);
    ls->dispatcher_ref = ls->req_mt_ref = LUA_NOREF;
    http_server_close(srv);
}

static void cancel_drain(void *ud)
{
    hserver *srv = ud;
    lua_server *ls = srv->user;
    ls->drain_wait = 0;
    http_server_cancel_drain(srv);
}

/* shutdown([drain_ms=5000]) -> true, or nil, "timeout". Yields: stops
 * accepting, lets in-flight requests finish (their responses say
 * Connection: close), closes idle connections at once and the rest when
 * the drain time is over. */
static int l_server_shutdown(lua_State *L)
{
    hserver *srv = check_server(L);
    lua_server *ls = srv->user;
    double ms = luaL_optnumber(L, 2, 5000);
    luaL_argcheck(L, ms >= 0, 2, "drain time must be >= 0");
    tamarco_check_task(L, "shutdown");
    if (ls->drain_wait)
        return luaL_error(L, "shutdown already in progress");
    if (http_server_shutdown(srv, (uint64_t)ms)) {
        lua_pushboolean(L, 1);
        return 1;
    }
    ls->drain_wait = tamarco_wait_begin(L, cancel_drain, srv);
    return tamarco_wait_yield(L);
}

/* stop_accepting(): closes the listening socket; connections stay. */
static int l_server_stop_accepting(lua_State *L)
{
    http_server_stop_accepting(check_server(L));
    return 0;
}

/* close(): closes everything now (in-flight responses are dropped). */
static int l_server_close(lua_State *L)
{
    server_box *box = luaL_checkudata(L, 1, SERVER_MT);
    server_close(L, box);
    return 0;
}

static int l_server_gc(lua_State *L)
{
    server_box *box = luaL_checkudata(L, 1, SERVER_MT);
    server_close(L, box);
    return 0;
}

/* address() -> ip, port (the bound port when listening on port 0) */
static int l_server_address(lua_State *L)
{
    hserver *srv = check_server(L);
    if (!srv->listening)
        return 0;
    struct sockaddr_storage ss;
    int len = sizeof ss;
    if (uv_tcp_getsockname(&srv->listener, (struct sockaddr *)&ss, &len) != 0)
        return 0;
    return push_address(L, &ss);
}

/* stats() -> { connections, accepted, rejected, requests, responses, ... } */
static int l_server_stats(lua_State *L)
{
    hserver *srv = check_server(L);
    int inflight = http_server_in_flight(srv);
    lua_createtable(L, 0, 12);
#define FIELD(name, value) (lua_pushnumber(L, (lua_Number)(value)), lua_setfield(L, -2, name))
    FIELD("connections", srv->nconns);
    FIELD("in_flight", inflight);
    FIELD("accepted", srv->n_accepted);
    FIELD("rejected", srv->n_rejected);
    FIELD("requests", srv->n_requests);
    FIELD("responses", srv->n_responses);
    FIELD("bad_requests", srv->n_bad_requests);
    FIELD("timeouts", srv->n_timeouts);
    FIELD("dropped_responses", srv->n_dropped_responses);
    FIELD("bytes_in", srv->n_bytes_in);
    FIELD("bytes_out", srv->n_bytes_out);
#undef FIELD
    lua_pushboolean(L, srv->listening);
    lua_setfield(L, -2, "listening");
    lua_pushboolean(L, srv->draining);
    lua_setfield(L, -2, "draining");
    return 1;
}

static int l_server_tostring(lua_State *L)
{
    server_box *box = luaL_checkudata(L, 1, SERVER_MT);
    lua_pushfstring(L, "http server (%s)", box->srv ? "open" : "closed");
    return 1;
}

/* ---------------------------------------------------------------- listen */

/* listen(options, dispatcher) -> server | nil, message, code
 * options: host ("127.0.0.1"), port (8080; 0 picks one), backlog (511),
 * reuse_port (false), max_header_size (8192), max_body_size (1 MiB),
 * max_headers (100), header_timeout (10 s), body_timeout (30 s),
 * idle_timeout (60 s), send_timeout (60 s) in milliseconds (0: none),
 * max_connections (10000), max_pipeline (64), server_name ("tamarco"). */
#define LISTEN "http_server.listen"   /* names the call in option errors */

static int l_listen(lua_State *L)
{
    tamarco_host *host = tamarco_check_host(L, "the HTTP server");
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TFUNCTION);

    lua_getfield(L, 1, "host");
    const char *ip = luaL_optstring(L, -1, "127.0.0.1");
    lua_pop(L, 1);   /* the options table keeps the string alive */
    double port = tamarco_opt_number(L, 1, LISTEN, "port", 8080, 0, 65535);
    if (port > 65535 || port != (int)port)
        return luaL_error(L, "option 'port' must be an integer in 0..65535");
    int backlog = (int)tamarco_opt_int(L, 1, LISTEN, "backlog", 511, 0, INT_MAX);
    int reuse_port = tamarco_opt_bool(L, 1, "reuse_port", 0);

    struct sockaddr_storage addr;
    memset(&addr, 0, sizeof addr);
    const char *bind_ip = strcmp(ip, "localhost") == 0 ? "127.0.0.1" : ip;
    int family = strchr(bind_ip, ':') ? AF_INET6 : AF_INET;
    int rc = family == AF_INET6 ? uv_ip6_addr(bind_ip, (int)port, (struct sockaddr_in6 *)&addr)
                                : uv_ip4_addr(bind_ip, (int)port, (struct sockaddr_in *)&addr);
    if (rc != 0) {
        lua_pushnil(L);
        lua_pushfstring(L, "cannot listen on %s:%d: invalid IP address", ip, (int)port);
        lua_pushstring(L, "EINVAL");
        return 3;
    }

    lua_getfield(L, 1, "server_name");
    const char *name = luaL_optstring(L, -1, "tamarco");
    lua_pop(L, 1);   /* the options table keeps the string alive */
    lua_server *ls = calloc(1, sizeof *ls);
    hserver *srv = ls ? http_server_new(host->loop, &engine_callbacks, ls) : NULL;
    if (!srv) {
        free(ls);
        return luaL_error(L, "out of memory");
    }
    ls->host = host;
    ls->dispatcher_ref = ls->req_mt_ref = LUA_NOREF;
    srv->max_header_size = (size_t)tamarco_opt_bytes(L, 1, LISTEN, "max_header_size", 8192);
    srv->max_body_size = (size_t)tamarco_opt_bytes(L, 1, LISTEN, "max_body_size", 1024 * 1024);
    srv->max_headers = (int)tamarco_opt_int(L, 1, LISTEN, "max_headers", 100, 0, INT_MAX);
    srv->header_timeout = (uint64_t)tamarco_opt_ms(L, 1, LISTEN, "header_timeout", 10000);
    srv->body_timeout = (uint64_t)tamarco_opt_ms(L, 1, LISTEN, "body_timeout", 30000);
    srv->idle_timeout = (uint64_t)tamarco_opt_ms(L, 1, LISTEN, "idle_timeout", 60000);
    srv->send_timeout = (uint64_t)tamarco_opt_ms(L, 1, LISTEN, "send_timeout", 60000);
    srv->max_connections = (int)tamarco_opt_int(L, 1, LISTEN, "max_connections", 10000, 0, INT_MAX);
    srv->max_pipeline = (int)tamarco_opt_int(L, 1, LISTEN, "max_pipeline", 64, 0, INT_MAX);
    if (srv->max_pipeline < 1)
        srv->max_pipeline = 1;
    if (http_server_set_name(srv, name) != 0) {
        http_server_close(srv);
        return luaL_error(L, "option 'server_name' is not a valid header value");
    }
    rc = http_server_listen(srv, (struct sockaddr *)&addr, backlog, reuse_port);
    if (rc != 0) {
        http_server_close(srv);
        lua_pushnil(L);
        lua_pushfstring(L, "cannot listen on %s:%d: %s", ip, (int)port, uv_strerror(rc));
        lua_pushstring(L, uv_err_name(rc));
        return 3;
    }

    lua_pushvalue(L, 2);
    ls->dispatcher_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    luaL_getmetatable(L, REQUEST_MT);
    ls->req_mt_ref = luaL_ref(L, LUA_REGISTRYINDEX);

    server_box *box = lua_newuserdata(L, sizeof *box);
    box->srv = srv;
    luaL_getmetatable(L, SERVER_MT);
    lua_setmetatable(L, -2);
    return 1;
}

/* pool_stats() -> pooled request structs (for tests and leak hunting) */
static int l_pool_stats(lua_State *L)
{
    lua_pushinteger(L, http_engine_pooled_requests());
    return 1;
}

int luaopen_tamarco_c_http_server(lua_State *L)
{
    static const luaL_Reg request_methods[] = {
        {"info", l_req_info},
        {"method", l_req_method},
        {"url", l_req_url},
        {"query_string", l_req_query_string},
        {"header", l_req_header},
        {"headers", l_req_headers},
        {"body", l_req_body},
        {"keep_alive", l_req_keep_alive},
        {"version", l_req_version},
        {"remote_address", l_req_remote_address},
        {"connected", l_req_connected},
        {"respond", l_req_respond},
        {NULL, NULL},
    };
    luaL_newmetatable(L, REQUEST_MT);
    int mt = lua_gettop(L);
    lua_createtable(L, 0, 12);
    for (const luaL_Reg *f = request_methods; f->name; f++) {
        lua_pushvalue(L, mt);
        lua_pushcclosure(L, f->func, 1);
        lua_setfield(L, -2, f->name);
    }
    lua_setfield(L, mt, "__index");
    lua_pushcfunction(L, l_req_tostring);
    lua_setfield(L, mt, "__tostring");
    lua_pushcfunction(L, l_req_gc);
    lua_setfield(L, mt, "__gc");
    lua_pushliteral(L, "http request");
    lua_setfield(L, mt, "__metatable");
    lua_pop(L, 1);

    static const luaL_Reg server_methods[] = {
        {"shutdown", l_server_shutdown},
        {"stop_accepting", l_server_stop_accepting},
        {"close", l_server_close},
        {"address", l_server_address},
        {"stats", l_server_stats},
        {NULL, NULL},
    };
    tamarco_class_register(L, SERVER_MT, server_methods, l_server_gc, l_server_tostring);

    static const luaL_Reg funcs[] = {
        {"listen", l_listen},
        {"pool_stats", l_pool_stats},
        {NULL, NULL},
    };
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    return 1;
}
