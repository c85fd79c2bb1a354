/*
 * tamarco.c.http_client: HTTP(S) requests through libcurl's multi
 * interface driven by the host's loop, so that nothing blocks and every
 * request of the process shares one connection pool. The Lua API, the
 * curl <-> libuv wiring and the shutdown: docs/internals/http-client.md.
 */
#include "host.h"
#include "byte_buffer.h"
#include "lua_class.h"
#include "lua_options.h"
#include "task_guard.h"

#include <curl/curl.h>
#include <ctype.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

/* Built as a loadable module (see TAMARCO_LOADABLE_BINDINGS in CMakeLists). */
int luaopen_tamarco_c_http_client(lua_State *L);

#define DEFAULT_MAX_BODY ((size_t)64 * 1024 * 1024)
#define EASY_POOL_SIZE 64

typedef struct http_multi http_multi;

typedef struct poll_ctx {
    uv_poll_t poll;
    curl_socket_t fd;
    http_multi *m;
    struct poll_ctx *prev, *next;
} poll_ctx;

typedef struct http_request {
    http_multi *m;
    int is_stream;       /* 1: the first member of an http_stream */
    CURL *easy;
    int wait_id;
    struct curl_slist *headers;
    tamarco_buf body;
    size_t max_body;
    int too_large;
    tamarco_buf hdrs;    /* "name\0value\0" pairs of the last response */
    char errbuf[CURL_ERROR_SIZE];
    struct http_request *prev, *next;
} http_request;

struct http_multi {
    tamarco_host *host;
    CURLM *multi;
    uv_timer_t timer;
    int timer_active;
    int in_flight;
    int sockets;
    http_request *requests;   /* in flight */
    poll_ctx *polls;          /* open */
    CURL *pool[EASY_POOL_SIZE];
    int pooled;
};

/* One host per process; the static pointer also keeps everything reachable
 * for leak checkers (the host never tears its state down before exit). */
static http_multi *the_multi;
static int curl_ready;
/* Requests dropped by a teardown while their task still waited: the
 * scheduler may still hold their cancel, which then only frees them. */
static http_request *zombies;

/* ---- references: only in-flight requests keep the loop alive ---- */

static void set_ref(uv_handle_t *h, int on)
{
    if (on)
        uv_ref(h);
    else
        uv_unref(h);
}

static void update_refs(http_multi *m)
{
    int on = m->in_flight > 0;
    set_ref((uv_handle_t *)&m->timer, on);
    for (poll_ctx *p = m->polls; p; p = p->next)
        set_ref((uv_handle_t *)&p->poll, on);
}

/* ---- requests ---- */

static void request_link(http_multi *m, http_request *req)
{
    req->prev = NULL;
    req->next = m->requests;
    if (m->requests)
        m->requests->prev = req;
    m->requests = req;
    if (m->in_flight++ == 0)
        update_refs(m);
}

static void request_unlink(http_multi *m, http_request *req)
{
    if (req->prev)
        req->prev->next = req->next;
    else
        m->requests = req->next;
    if (req->next)
        req->next->prev = req->prev;
    req->prev = req->next = NULL;
    if (--m->in_flight == 0)
        update_refs(m);
}

static void request_free(http_request *req)
{
    http_multi *m = req->m;
    if (req->easy) {
        if (m && m->multi && m->pooled < EASY_POOL_SIZE) {
            curl_easy_reset(req->easy);
            m->pool[m->pooled++] = req->easy;
        } else {
            curl_easy_cleanup(req->easy);
        }
    }
    curl_slist_free_all(req->headers);
    tamarco_buf_free(&req->body);
    tamarco_buf_free(&req->hdrs);
    free(req);
}

static size_t on_body(char *data, size_t size, size_t nmemb, void *ud)
{
    http_request *req = ud;
    size_t n = size * nmemb;
    if (n > req->max_body - req->body.len) {
        req->too_large = 1;
        return 0;   /* CURLE_WRITE_ERROR */
    }
    tamarco_buf_add(&req->body, data, n);
    return req->body.oom ? 0 : n;
}

/* Appends one NUL-terminated string to the header pairs. */
static int hdrs_append(http_request *req, const char *s, size_t n)
{
    tamarco_buf_add(&req->hdrs, s, n);
    tamarco_buf_addc(&req->hdrs, '\0');
    return req->hdrs.oom ? -1 : 0;
}

/* One raw header line per call; a status line starts a new response
 * (redirects, 100 Continue), so only the last response's headers remain. */
static size_t on_header(char *line, size_t size, size_t nmemb, void *ud)
{
    http_request *req = ud;
    size_t n = size * nmemb;
    if (n >= 5 && memcmp(line, "HTTP/", 5) == 0) {
        req->hdrs.len = 0;
        return n;
    }
    char *colon = memchr(line, ':', n);
    if (!colon || colon == line)
        return n;   /* blank line, folded continuation: ignored */
    size_t name_len = (size_t)(colon - line);
    const char *v = colon + 1, *end = line + n;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\t'))
        end--;
    for (size_t i = 0; i < name_len; i++)
        line[i] = (char)tolower((unsigned char)line[i]);
    if (hdrs_append(req, line, name_len) != 0 || hdrs_append(req, v, (size_t)(end - v)) != 0)
        return 0;
    return n;
}

/* ---- results ---- */

typedef struct completion {
    http_request *req;
    CURLcode rc;
} completion;

static const char *error_kind(CURLcode rc, int too_large)
{
    if (too_large)
        return "too_large";
    switch (rc) {
    case CURLE_OPERATION_TIMEDOUT:
        return "timeout";
    case CURLE_COULDNT_CONNECT:
        return "connect";
    case CURLE_COULDNT_RESOLVE_HOST:
    case CURLE_COULDNT_RESOLVE_PROXY:
        return "resolve";
    case CURLE_SSL_CONNECT_ERROR:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_USE_SSL_FAILED:
        return "tls";
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
    case CURLE_WEIRD_SERVER_REPLY:
    case CURLE_GOT_NOTHING:
    case CURLE_TOO_MANY_REDIRECTS:
    case CURLE_HTTP2:
    case CURLE_HTTP2_STREAM:
        return "protocol";
    default:
        return "error";
    }
}

static int push_headers(lua_State *co, http_request *req)
{
    lua_newtable(co);
    size_t i = 0;
    while (i < req->hdrs.len) {
        const char *name = req->hdrs.data + i;
        size_t name_len = strlen(name);
        const char *value = name + name_len + 1;
        size_t value_len = strlen(value);
        i += name_len + 1 + value_len + 1;
        lua_pushlstring(co, name, name_len);
        lua_pushvalue(co, -1);
        lua_rawget(co, -3);
        if (lua_isstring(co, -1)) {
            lua_pushliteral(co, ", ");
            lua_pushlstring(co, value, value_len);
            lua_concat(co, 3);
        } else {
            lua_pop(co, 1);
            lua_pushlstring(co, value, value_len);
        }
        lua_rawset(co, -3);
    }
    return 1;
}

static int push_result(lua_State *co, void *ud)
{
    completion *c = ud;
    http_request *req = c->req;
    luaL_checkstack(co, 8, "http_client results");
    if (c->rc == CURLE_OK) {
        long status = 0;
        curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &status);
        lua_pushinteger(co, (lua_Integer)status);
        lua_pushlstring(co, req->body.len ? req->body.data : "", req->body.len);
        push_headers(co, req);
        return 3;
    }
    lua_pushnil(co);
    if (req->too_large) {
        lua_pushfstring(co, "response body exceeds max_body_bytes (%f bytes)", (lua_Number)req->max_body);
    } else {
        const char *text = req->errbuf[0] ? req->errbuf : curl_easy_strerror(c->rc);
        if (c->rc == CURLE_OPERATION_TIMEDOUT)
            lua_pushfstring(co, "timeout: %s", text);
        else
            lua_pushstring(co, text);
    }
    lua_pushstring(co, error_kind(c->rc, req->too_large));
    return 3;
}

static void stream_finished(http_multi *m, http_request *req, CURLcode rc);
static void process_streams(http_multi *m);

static void check_done(http_multi *m)
{
    CURLMsg *msg;
    int left;
    while ((msg = curl_multi_info_read(m->multi, &left))) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        CURL *easy = msg->easy_handle;
        completion c = {NULL, msg->data.result};
        char *priv = NULL;
        curl_easy_getinfo(easy, CURLINFO_PRIVATE, &priv);
        c.req = (http_request *)priv;
        if (c.req->is_stream) {
            stream_finished(m, c.req, c.rc);
            continue;
        }
        curl_multi_remove_handle(m->multi, easy);   /* msg is invalid from here */
        request_unlink(m, c.req);
        /* Resumes the task now; it may start or cancel other requests,
         * which is fine outside curl's callbacks. */
        tamarco_wake(m->host, c.req->wait_id, push_result, &c);
        request_free(c.req);
    }
    process_streams(m);
}

/* ---- libuv <-> curl ---- */

static void on_timer(uv_timer_t *timer)
{
    http_multi *m = timer->data;
    int running;
    m->timer_active = 0;
    curl_multi_socket_action(m->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_done(m);
}

static int on_curl_timer(CURLM *multi, long timeout_ms, void *userp)
{
    http_multi *m = userp;
    if (timeout_ms < 0) {
        uv_timer_stop(&m->timer);
        m->timer_active = 0;
    } else {
        uv_timer_start(&m->timer, on_timer, (uint64_t)timeout_ms, 0);
        m->timer_active = 1;
    }
    return 0;
}

static void on_poll(uv_poll_t *handle, int status, int events)
{
    poll_ctx *p = handle->data;
    http_multi *m = p->m;
    curl_socket_t fd = p->fd;   /* p may be closed by the call below */
    int flags = 0;
    if (status < 0)
        flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    int running;
    curl_multi_socket_action(m->multi, fd, flags, &running);
    check_done(m);
}

static void free_poll(uv_handle_t *handle)
{
    free(handle->data);
}

static void poll_close(http_multi *m, poll_ctx *p)
{
    if (p->prev)
        p->prev->next = p->next;
    else
        m->polls = p->next;
    if (p->next)
        p->next->prev = p->prev;
    m->sockets--;
    uv_close((uv_handle_t *)&p->poll, free_poll);   /* stops polling now */
}

static int on_curl_socket(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    http_multi *m = userp;
    poll_ctx *p = socketp;
    if (what == CURL_POLL_REMOVE) {
        if (p) {
            poll_close(m, p);
            curl_multi_assign(m->multi, s, NULL);
        }
        return 0;
    }
    if (!p) {
        p = calloc(1, sizeof *p);
        if (!p)
            return -1;
        if (uv_poll_init_socket(m->host->loop, &p->poll, s) != 0) {
            free(p);
            return -1;
        }
        p->fd = s;
        p->m = m;
        p->poll.data = p;
        p->next = m->polls;
        if (m->polls)
            m->polls->prev = p;
        m->polls = p;
        m->sockets++;
        set_ref((uv_handle_t *)&p->poll, m->in_flight > 0);
        curl_multi_assign(m->multi, s, p);
    }
    int events = 0;
    if (what & CURL_POLL_IN)
        events |= UV_READABLE;
    if (what & CURL_POLL_OUT)
        events |= UV_WRITABLE;
    uv_poll_start(&p->poll, events, on_poll);
    return 0;
}

/* ---- the multi ---- */

static http_multi *get_multi(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    if (!host)
        luaL_error(L, "the HTTP client runs on the service's main state, not in a thread");
    if (the_multi) {
        if (the_multi->host != host)
            luaL_error(L, "the HTTP client supports one host per process");
        return the_multi;
    }
    if (!curl_ready) {
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
            luaL_error(L, "curl_global_init failed");
        curl_ready = 1;
    }
    http_multi *m = calloc(1, sizeof *m);
    if (!m)
        luaL_error(L, "out of memory");
    m->host = host;
    m->multi = curl_multi_init();
    if (!m->multi) {
        free(m);
        luaL_error(L, "curl_multi_init failed");
    }
    uv_timer_init(host->loop, &m->timer);
    m->timer.data = m;
    uv_unref((uv_handle_t *)&m->timer);
    curl_multi_setopt(m->multi, CURLMOPT_SOCKETFUNCTION, on_curl_socket);
    curl_multi_setopt(m->multi, CURLMOPT_SOCKETDATA, m);
    curl_multi_setopt(m->multi, CURLMOPT_TIMERFUNCTION, on_curl_timer);
    curl_multi_setopt(m->multi, CURLMOPT_TIMERDATA, m);
    the_multi = m;
    return m;
}

static void cancel_request(void *ud)
{
    http_request *req = ud;
    http_multi *m = req->m;
    if (!m) {   /* a zombie */
        if (req->prev)
            req->prev->next = req->next;
        else
            zombies = req->next;
        if (req->next)
            req->next->prev = req->prev;
        free(req);
        return;
    }
    curl_multi_remove_handle(m->multi, req->easy);
    request_unlink(m, req);
    request_free(req);
}

/* ---- request(opts) ---- */

static int is_header_value(lua_State *L, int idx)
{
    int t = lua_type(L, idx);
    return t == LUA_TSTRING || t == LUA_TNUMBER;
}

static int bad_header_text(const char *s)
{
    return strpbrk(s, "\r\n") != NULL;
}

/* First pass over opts.headers (at stack top): raises on bad input before
 * anything is allocated. */
static void check_headers(lua_State *L, int t)
{
    lua_pushnil(L);
    while (lua_next(L, t)) {
        if (lua_type(L, -2) != LUA_TSTRING || bad_header_text(lua_tostring(L, -2)) ||
            strchr(lua_tostring(L, -2), ':'))
            luaL_error(L, "request: header names must be strings without ':' or newlines");
        if (lua_type(L, -1) == LUA_TTABLE) {
            int n = (int)lua_objlen(L, -1);
            for (int i = 1; i <= n; i++) {
                lua_rawgeti(L, -1, i);
                if (!is_header_value(L, -1) || bad_header_text(lua_tostring(L, -1)))
                    luaL_error(L, "request: header '%s' has a bad value", lua_tostring(L, -3));
                lua_pop(L, 1);
            }
        } else if (lua_type(L, -1) != LUA_TBOOLEAN || lua_toboolean(L, -1)) {
            if (!is_header_value(L, -1))
                luaL_error(L, "request: header '%s' must be a string, a number, a list or false",
                           lua_tostring(L, -2));
            lua_pushvalue(L, -1);
            int bad = bad_header_text(lua_tostring(L, -1));
            lua_pop(L, 1);
            if (bad)
                luaL_error(L, "request: header '%s' contains a newline", lua_tostring(L, -2));
        }
        lua_pop(L, 1);
    }
}

static struct curl_slist *add_header(struct curl_slist *list, const char *name, const char *value, int *failed)
{
    if (*failed)
        return list;
    size_t n = strlen(name), v = value ? strlen(value) : 0;
    char *line = malloc(n + v + 3);
    if (!line) {
        *failed = 1;
        return list;
    }
    if (!value)                /* "Name:" removes a header curl would add */
        snprintf(line, n + 2, "%s:", name);
    else if (v == 0)           /* "Name;" sends it empty */
        snprintf(line, n + 2, "%s;", name);
    else
        snprintf(line, n + v + 3, "%s: %s", name, value);
    struct curl_slist *grown = curl_slist_append(list, line);
    free(line);
    if (!grown) {
        *failed = 1;
        return list;
    }
    return grown;
}

/* Second pass: builds the list; cannot raise. */
static struct curl_slist *build_headers(lua_State *L, int t, int *has_expect, int *failed)
{
    struct curl_slist *list = NULL;
    lua_pushnil(L);
    while (lua_next(L, t)) {
        const char *name = lua_tostring(L, -2);
        if (strcasecmp(name, "expect") == 0)
            *has_expect = 1;
        if (lua_type(L, -1) == LUA_TTABLE) {
            int n = (int)lua_objlen(L, -1);
            for (int i = 1; i <= n; i++) {
                lua_rawgeti(L, -1, i);
                list = add_header(list, name, lua_tostring(L, -1), failed);
                lua_pop(L, 1);
            }
        } else if (lua_type(L, -1) == LUA_TBOOLEAN) {
            list = add_header(list, name, NULL, failed);
        } else {
            lua_pushvalue(L, -1);   /* tostring on a copy: lua_next needs the key intact */
            list = add_header(list, name, lua_tostring(L, -1), failed);
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    return list;
}

static int fail(lua_State *L, const char *message, const char *kind)
{
    lua_pushnil(L);
    lua_pushstring(L, message);
    lua_pushstring(L, kind);
    return 3;
}

/* The options request() and stream() share, read from opts (index 1) before
 * anything is allocated: everything that can raise is here. */
typedef struct request_options {
    const char *url, *method, *ca_file, *body;
    size_t body_len;
    long timeout_ms, connect_timeout_ms, max_redirs;
    int verify_tls;
    int headers_index;   /* stack index of opts.headers, 0 when none */
} request_options;

static void read_options(lua_State *L, const char *op, request_options *o)
{
    o->url = tamarco_opt_string(L, 1, op, "url", NULL);
    if (!o->url)
        luaL_error(L, "%s: 'url' is required", op);
    o->method = tamarco_opt_string(L, 1, op, "method", "GET");
    o->ca_file = tamarco_opt_string(L, 1, op, "ca_file", NULL);
    o->timeout_ms = tamarco_opt_ms(L, 1, op, "timeout_ms", 0);
    o->connect_timeout_ms = tamarco_opt_ms(L, 1, op, "connect_timeout_ms", 0);
    o->verify_tls = tamarco_opt_bool(L, 1, "verify_tls", 1);
    o->max_redirs = 0;
    lua_getfield(L, 1, "follow_redirects");
    if (lua_type(L, -1) == LUA_TNUMBER)
        o->max_redirs = (long)lua_tonumber(L, -1);
    else if (lua_toboolean(L, -1))
        o->max_redirs = 10;
    lua_pop(L, 1);
    o->body = NULL;
    o->body_len = 0;
    lua_getfield(L, 1, "body");   /* stays on the stack: the string lives until the call ends */
    if (!lua_isnil(L, -1)) {
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "%s: 'body' must be a string", op);
        o->body = lua_tolstring(L, -1, &o->body_len);
    }
    lua_getfield(L, 1, "headers");
    o->headers_index = 0;
    if (!lua_isnil(L, -1)) {
        luaL_argcheck(L, lua_istable(L, -1), 1, "'headers' must be a table");
        o->headers_index = lua_gettop(L);
        check_headers(L, o->headers_index);
    }
    if (!*o->method)
        luaL_error(L, "%s: empty method", op);
    for (const char *c = o->method; *c; c++)
        if (!isalpha((unsigned char)*c) && *c != '-' && *c != '_')
            luaL_error(L, "%s: bad method '%s'", op, o->method);
}

/* The header list of a transfer: the caller's headers, and no
 * `Expect: 100-continue` round trip for a body unless the caller asked. Cannot
 * raise; *failed is set when memory runs out. */
static struct curl_slist *request_headers(lua_State *L, const request_options *o, int *failed)
{
    struct curl_slist *list = NULL;
    int has_expect = 0;
    if (o->headers_index)
        list = build_headers(L, o->headers_index, &has_expect, failed);
    if (!*failed && o->body && !has_expect)
        list = add_header(list, "Expect", NULL, failed);
    return list;
}

/* Everything request() and stream() set on an easy handle alike; the write
 * and header callbacks get `ud`. Returns CURLE_OK or the URL's error. */
static CURLcode configure_easy(CURL *e, const request_options *o, http_request *req,
                               curl_write_callback on_write, curl_write_callback on_head, void *ud)
{
    curl_easy_setopt(e, CURLOPT_PRIVATE, (char *)req);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, req->errbuf);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, ud);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_head);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, ud);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "tamarco-host/" TAMARCO_VERSION);
    /* long-lived connections (pooled, or a stream open for hours) notice a
     * peer that vanished */
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPIDLE, 30L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPINTVL, 10L);
#if LIBCURL_VERSION_NUM >= 0x075500
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
#endif
    CURLcode rc = curl_easy_setopt(e, CURLOPT_URL, o->url);
    if (rc != CURLE_OK)
        return rc;
    if (o->timeout_ms > 0)
        curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, o->timeout_ms);
    if (o->connect_timeout_ms > 0)
        curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, o->connect_timeout_ms);
    if (o->max_redirs > 0) {
        curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L);
        curl_easy_setopt(e, CURLOPT_MAXREDIRS, o->max_redirs);
    }
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, o->verify_tls ? 1L : 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, o->verify_tls ? 2L : 0L);
    if (o->ca_file)
        curl_easy_setopt(e, CURLOPT_CAINFO, o->ca_file);
    if (req->headers)
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, req->headers);

    const char *method = o->method;
    if (strcmp(method, "HEAD") == 0) {
        curl_easy_setopt(e, CURLOPT_NOBODY, 1L);
    } else if (o->body) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)o->body_len);
        curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, o->body);
        if (strcmp(method, "POST") != 0)
            curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    } else if (strcmp(method, "GET") != 0) {
        if (strcmp(method, "POST") == 0 || strcmp(method, "PUT") == 0 || strcmp(method, "PATCH") == 0) {
            curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, 0L);   /* empty body, Content-Length: 0 */
            curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, "");
        }
        curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    }
    return CURLE_OK;
}

/* For /debug/tasks: "METHOD url" (an etcd watch is a stream on /v3/watch). */
static void describe_wait(tamarco_host *host, int wait_id, const char *method, const char *url)
{
    char what[TAMARCO_WAIT_DETAIL_MAX];
    snprintf(what, sizeof what, "%s %s", method, url ? url : "?");
    int etcd_watch = url && strstr(url, "/v3/watch") != NULL;
    tamarco_wait_note(host, wait_id, etcd_watch ? "etcd watch" : "http", what, 0);
}

static int l_request(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    tamarco_check_host(L, "the HTTP client");
    tamarco_check_task(L, "http_client.request");

    /* Everything that can raise comes before any allocation. */
    request_options o;
    read_options(L, "request", &o);
    long max_body = tamarco_opt_bytes(L, 1, "request", "max_body_bytes", (long)DEFAULT_MAX_BODY);
    http_multi *m = get_multi(L);

    http_request *req = calloc(1, sizeof *req);
    if (!req)
        return luaL_error(L, "out of memory");
    req->m = m;
    req->max_body = (size_t)max_body;
    req->easy = m->pooled ? m->pool[--m->pooled] : curl_easy_init();
    int failed = req->easy == NULL;
    if (!failed)
        req->headers = request_headers(L, &o, &failed);
    if (failed) {
        request_free(req);
        return fail(L, "out of memory", "error");
    }

    CURL *e = req->easy;
    if (configure_easy(e, &o, req, on_body, on_header, req) != CURLE_OK) {
        request_free(req);
        return fail(L, "bad url", "protocol");
    }

    CURLMcode mc = curl_multi_add_handle(m->multi, e);
    if (mc != CURLM_OK) {
        request_free(req);
        return fail(L, curl_multi_strerror(mc), "error");
    }
    request_link(m, req);
    /* curl does no I/O in add_handle (it only arms the timer), so the
     * transfer cannot finish before the wait exists. */
    req->wait_id = tamarco_wait_begin(L, cancel_request, req);
    describe_wait(m->host, req->wait_id, o.method, o.url);
    return tamarco_wait_yield(L);
}

/* ---- stream(opts): a response read chunk by chunk ----
 *
 *   stream{method, url, headers, body, connect_timeout_ms, timeout_ms,
 *          verify_tls, ca_file, max_buffer_bytes} -> handle  (does not yield)
 *   handle:response() -> status, headers | nil, message, kind   (yields until
 *                        the response headers are in)
 *   handle:read()     -> chunk            the bytes received since the last read
 *                     -> nil              the response ended
 *                     -> nil, message, kind   transfer error, or "closed"
 *   handle:close()    aborts the transfer; a task waiting in read() or
 *                     response() gets nil, "stream closed", "closed"
 *   handle:info()     -> {status, finished, buffered, paused}
 *
 * Redirects are not followed and timeout_ms defaults to none (a stream may
 * stay open for hours, e.g. an etcd watch); TCP keep-alive is on. When more
 * than max_buffer_bytes (default 1 MiB) wait unread, the transfer is paused
 * until the next read(). One task at a time reads a stream. The handle is a
 * userdata: when it is collected the transfer is aborted. An open stream
 * counts as in flight (it keeps the loop alive).
 */

#define STREAM_MT "tamarco.http_client.stream"
#define DEFAULT_MAX_BUFFER ((size_t)1024 * 1024)

enum { WAIT_NONE, WAIT_READ, WAIT_RESPONSE };

typedef struct http_stream {
    http_request r;      /* first: CURLINFO_PRIVATE points at both */
    tamarco_host *host;
    int headers_done, finished, closed, paused, notify, waiting;
    int reader_ref;      /* registry ref of the waiting coroutine */
    CURLcode rc;
    long status;
    size_t max_buffer;
} http_stream;

static void release_easy(http_multi *m, CURL *easy)
{
    if (!easy)
        return;
    if (m && m->multi && m->pooled < EASY_POOL_SIZE) {
        curl_easy_reset(easy);
        m->pool[m->pooled++] = easy;
    } else {
        curl_easy_cleanup(easy);
    }
}

static size_t on_stream_body(char *data, size_t size, size_t nmemb, void *ud)
{
    http_stream *s = ud;
    http_request *r = &s->r;
    size_t n = size * nmemb;
    if (n == 0)
        return 0;
    if (r->body.len >= s->max_buffer) {
        s->paused = 1;
        return CURL_WRITEFUNC_PAUSE;   /* curl keeps the data for later */
    }
    tamarco_buf_add(&r->body, data, n);
    if (r->body.oom)
        return 0;
    if (!s->headers_done) {
        long code = 0;
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &code);
        s->status = code;
        s->headers_done = 1;
    }
    s->notify = 1;
    return n;
}

static size_t on_stream_header(char *line, size_t size, size_t nmemb, void *ud)
{
    http_stream *s = ud;
    size_t n = size * nmemb;
    if (n <= 2 && n > 0 && (line[0] == '\r' || line[0] == '\n')) {
        long code = 0;
        curl_easy_getinfo(s->r.easy, CURLINFO_RESPONSE_CODE, &code);
        if (code >= 200 && !s->headers_done) {   /* not a 1xx interim response */
            s->status = code;
            s->headers_done = 1;
            s->notify = 1;
        }
        return n;
    }
    return on_header(line, size, nmemb, &s->r);
}

static void stream_clear_wait(http_stream *s)
{
    s->r.wait_id = 0;
    s->waiting = WAIT_NONE;
    if (s->reader_ref != LUA_NOREF) {
        luaL_unref(s->host->L, LUA_REGISTRYINDEX, s->reader_ref);
        s->reader_ref = LUA_NOREF;
    }
}

static void cancel_stream_wait(void *ud)
{
    stream_clear_wait(ud);
}

static int stream_error(lua_State *co, http_stream *s)
{
    lua_pushnil(co);
    if (s->closed) {
        lua_pushliteral(co, "stream closed");
        lua_pushliteral(co, "closed");
        return 3;
    }
    const char *text = s->r.errbuf[0] ? s->r.errbuf : curl_easy_strerror(s->rc);
    if (s->rc == CURLE_OPERATION_TIMEDOUT)
        lua_pushfstring(co, "timeout: %s", text);
    else
        lua_pushstring(co, text);
    lua_pushstring(co, error_kind(s->rc, 0));
    return 3;
}

/* The results of read(), when it has some (else 0 and nothing pushed). */
static int stream_push_read(lua_State *co, http_stream *s)
{
    if (s->r.body.len > 0 && !s->closed) {
        lua_pushlstring(co, s->r.body.data, s->r.body.len);
        s->r.body.len = 0;
        /* room again: a paused transfer goes on, whether this read found the
         * bytes at once or was woken for them */
        if (s->paused && !s->finished && s->r.easy) {
            s->paused = 0;
            curl_easy_pause(s->r.easy, CURLPAUSE_CONT);   /* may deliver more now */
        }
        return 1;
    }
    if (s->closed || (s->finished && s->rc != CURLE_OK))
        return stream_error(co, s);
    if (s->finished) {
        lua_pushnil(co);
        return 1;
    }
    return 0;
}

static int stream_push_response(lua_State *co, http_stream *s)
{
    if (s->closed || (s->finished && s->rc != CURLE_OK))
        return stream_error(co, s);
    if (s->headers_done || s->finished) {
        lua_pushinteger(co, (lua_Integer)s->status);
        push_headers(co, &s->r);
        return 2;
    }
    return 0;
}

static int push_stream_wait(lua_State *co, void *ud)
{
    http_stream *s = ud;
    luaL_checkstack(co, 8, "http_client stream results");
    return s->waiting == WAIT_READ ? stream_push_read(co, s) : stream_push_response(co, s);
}

static int stream_ready(http_stream *s)
{
    if (s->closed || s->finished)
        return 1;
    return s->waiting == WAIT_READ ? s->r.body.len > 0 : s->headers_done;
}

/* Resumes the stream's reader when what it waits for is there. Called from
 * loop callbacks only, outside curl's callbacks. `s` may be freed by the
 * resumed task: nothing touches it afterwards. */
static void stream_wake(http_stream *s)
{
    if (!s->r.wait_id || !stream_ready(s))
        return;
    int id = s->r.wait_id;
    int waiting = s->waiting;
    s->r.wait_id = 0;
    if (s->reader_ref != LUA_NOREF) {
        luaL_unref(s->host->L, LUA_REGISTRYINDEX, s->reader_ref);
        s->reader_ref = LUA_NOREF;
    }
    s->waiting = waiting;   /* push_stream_wait reads it */
    tamarco_wake(s->host, id, push_stream_wait, s);
}

static void process_streams(http_multi *m)
{
    int again = 1;
    while (again) {
        again = 0;
        for (http_request *r = m->requests; r; r = r->next) {
            if (!r->is_stream)
                continue;
            http_stream *s = (http_stream *)r;
            if (!s->notify)
                continue;
            s->notify = 0;
            if (s->r.wait_id && stream_ready(s)) {
                stream_wake(s);   /* may change the list: rescan */
                again = 1;
                break;
            }
        }
    }
}

/* Takes the stream out of the multi (finished or aborted). */
static void stream_detach(http_stream *s)
{
    http_multi *m = s->r.m;
    if (!m || s->finished)
        return;
    if (!s->status && s->r.easy)
        curl_easy_getinfo(s->r.easy, CURLINFO_RESPONSE_CODE, &s->status);
    curl_multi_remove_handle(m->multi, s->r.easy);
    request_unlink(m, &s->r);
    release_easy(m, s->r.easy);
    s->r.easy = NULL;
    curl_slist_free_all(s->r.headers);
    s->r.headers = NULL;
    s->finished = 1;
    s->paused = 0;
}

static void stream_finished(http_multi *m, http_request *req, CURLcode rc)
{
    (void)m;
    http_stream *s = (http_stream *)req;
    s->rc = rc;
    stream_detach(s);
    if (rc == CURLE_OK)
        s->headers_done = 1;
    stream_wake(s);
}

/* Interrupts the task waiting on the stream (on the next loop turn) with
 * nil, "stream closed", "closed" through the scheduler's interrupt, which
 * also calls cancel_stream_wait. */
static void stream_interrupt_reader(lua_State *L, http_stream *s)
{
    if (!s->r.wait_id || s->reader_ref == LUA_NOREF)
        return;
    int top = lua_gettop(L);
    lua_getfield(L, LUA_REGISTRYINDEX, "_LOADED");
    lua_getfield(L, -1, "tamarco.c.scheduler");
    if (lua_istable(L, -1)) {
        lua_getfield(L, -1, "interrupt");
        lua_rawgeti(L, LUA_REGISTRYINDEX, s->reader_ref);
        lua_pushnil(L);
        lua_pushliteral(L, "stream closed");
        lua_pushliteral(L, "closed");
        lua_call(L, 4, 0);
    }
    lua_settop(L, top);
    stream_clear_wait(s);   /* in case interrupt found no wait */
}

static void stream_close(lua_State *L, http_stream *s)
{
    if (s->closed)
        return;
    s->closed = 1;
    if (s->r.m && !s->finished) {
        s->rc = CURLE_ABORTED_BY_CALLBACK;
        stream_detach(s);
    }
    tamarco_buf_free(&s->r.body);
    if (L)
        stream_interrupt_reader(L, s);
}

static http_stream *check_stream(lua_State *L)
{
    http_stream **box = luaL_checkudata(L, 1, STREAM_MT);
    if (!*box)
        luaL_error(L, "http_client stream: already collected");
    return *box;
}

static int l_stream_gc(lua_State *L)
{
    http_stream **box = luaL_checkudata(L, 1, STREAM_MT);
    http_stream *s = *box;
    if (!s)
        return 0;
    *box = NULL;
    stream_close(NULL, s);
    stream_clear_wait(s);
    tamarco_buf_free(&s->r.hdrs);
    free(s);
    return 0;
}

static int l_stream_close(lua_State *L)
{
    stream_close(L, check_stream(L));
    return 0;
}

static int stream_wait(lua_State *L, http_stream *s, int what)
{
    if (s->r.wait_id)
        return luaL_error(L, "http_client stream: another task is already waiting on it");
    tamarco_check_task(L, "http_client stream:read/response");
    s->waiting = what;
    s->r.wait_id = tamarco_wait_begin(L, cancel_stream_wait, s);
    char *url = NULL;
    if (s->r.easy)
        curl_easy_getinfo(s->r.easy, CURLINFO_EFFECTIVE_URL, &url);
    describe_wait(s->host, s->r.wait_id, "stream", url);
    lua_pushthread(L);
    s->reader_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return tamarco_wait_yield(L);
}

static int l_stream_read(lua_State *L)
{
    http_stream *s = check_stream(L);
    int n = stream_push_read(L, s);
    if (n > 0)
        return n;
    s->notify = 0;
    return stream_wait(L, s, WAIT_READ);
}

static int l_stream_response(lua_State *L)
{
    http_stream *s = check_stream(L);
    int n = stream_push_response(L, s);
    if (n > 0)
        return n;
    return stream_wait(L, s, WAIT_RESPONSE);
}

static int l_stream_info(lua_State *L)
{
    http_stream *s = check_stream(L);
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, (lua_Integer)s->status);
    lua_setfield(L, -2, "status");
    lua_pushboolean(L, s->finished);
    lua_setfield(L, -2, "finished");
    lua_pushboolean(L, s->closed);
    lua_setfield(L, -2, "closed");
    lua_pushinteger(L, (lua_Integer)s->r.body.len);
    lua_setfield(L, -2, "buffered");
    lua_pushboolean(L, s->paused);
    lua_setfield(L, -2, "paused");
    return 1;
}

/* A stream that never made it into the multi: its handle's __gc only frees. */
static void stream_abandon(http_multi *m, http_stream *s)
{
    s->finished = 1;
    release_easy(m, s->r.easy);
    s->r.easy = NULL;
    curl_slist_free_all(s->r.headers);
    s->r.headers = NULL;
}

static int l_stream(lua_State *L)
{
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    tamarco_check_host(L, "the HTTP client");

    request_options o;
    read_options(L, "stream", &o);
    o.max_redirs = 0;   /* a stream reads the response it asked for */
    long max_buffer = tamarco_opt_bytes(L, 1, "stream", "max_buffer_bytes", (long)DEFAULT_MAX_BUFFER);
    if (max_buffer < 1)
        max_buffer = 1;
    http_multi *m = get_multi(L);

    /* the handle first: raising after it is safe (its __gc frees) */
    http_stream **box = lua_newuserdata(L, sizeof *box);
    *box = NULL;
    luaL_getmetatable(L, STREAM_MT);
    lua_setmetatable(L, -2);
    int box_index = lua_gettop(L);

    http_stream *s = calloc(1, sizeof *s);
    if (!s)
        return luaL_error(L, "out of memory");
    *box = s;
    s->host = m->host;
    s->reader_ref = LUA_NOREF;
    s->max_buffer = (size_t)max_buffer;
    http_request *req = &s->r;
    req->is_stream = 1;
    req->m = m;
    req->easy = m->pooled ? m->pool[--m->pooled] : curl_easy_init();
    int failed = req->easy == NULL;
    if (!failed)
        req->headers = request_headers(L, &o, &failed);
    if (failed) {
        stream_abandon(m, s);
        return fail(L, "out of memory", "error");
    }

    CURL *e = req->easy;
    if (configure_easy(e, &o, req, on_stream_body, on_stream_header, s) != CURLE_OK) {
        stream_abandon(m, s);
        return fail(L, "bad url", "protocol");
    }
    CURLMcode mc = curl_multi_add_handle(m->multi, e);
    if (mc != CURLM_OK) {
        stream_abandon(m, s);
        return fail(L, curl_multi_strerror(mc), "error");
    }
    request_link(m, req);
    lua_pushvalue(L, box_index);
    return 1;
}

static void register_stream_mt(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"read", l_stream_read},
        {"response", l_stream_response},
        {"close", l_stream_close},
        {"info", l_stream_info},
        {NULL, NULL},
    };
    tamarco_class_register(L, STREAM_MT, methods, l_stream_gc, NULL);
}

static int l_stats(lua_State *L)
{
    http_multi *m = the_multi;
    lua_createtable(L, 0, 5);
    lua_pushboolean(L, m != NULL);
    lua_setfield(L, -2, "multi");
    lua_pushinteger(L, m ? m->in_flight : 0);
    lua_setfield(L, -2, "in_flight");
    lua_pushinteger(L, m ? m->sockets : 0);
    lua_setfield(L, -2, "sockets");
    lua_pushinteger(L, m ? m->pooled : 0);
    lua_setfield(L, -2, "pooled");
    lua_pushboolean(L, m ? m->timer_active : 0);
    lua_setfield(L, -2, "timer_active");
    return 1;
}

static void free_multi_on_close(uv_handle_t *handle)
{
    free(handle->data);
}

/* Closes the multi: every cached connection, socket watcher and the timer.
 * Requests still in flight are dropped (their tasks are not resumed). */
static void teardown(http_multi *m)
{
    while (m->requests) {
        http_request *req = m->requests;
        if (req->is_stream) {   /* the handle's __gc frees it later */
            http_stream *s = (http_stream *)req;
            s->rc = CURLE_ABORTED_BY_CALLBACK;
            stream_detach(s);
            continue;
        }
        curl_multi_remove_handle(m->multi, req->easy);
        request_unlink(m, req);
        curl_easy_cleanup(req->easy);
        curl_slist_free_all(req->headers);
        tamarco_buf_free(&req->body);
        tamarco_buf_free(&req->hdrs);
        req->easy = NULL;
        req->headers = NULL;
        req->m = NULL;
        req->prev = NULL;
        req->next = zombies;
        if (zombies)
            zombies->prev = req;
        zombies = req;
    }
    while (m->pooled > 0)
        curl_easy_cleanup(m->pool[--m->pooled]);
    curl_multi_cleanup(m->multi);   /* may report socket removals: still valid here */
    m->multi = NULL;
    while (m->polls)
        poll_close(m, m->polls);
    if (the_multi == m)
        the_multi = NULL;
    uv_timer_stop(&m->timer);
    m->timer.data = m;
    uv_close((uv_handle_t *)&m->timer, free_multi_on_close);
}

/* shutdown(): closes every cached connection and the multi handle when no
 * request is in flight; the next request creates a fresh one. */
static int l_shutdown(lua_State *L)
{
    http_multi *m = the_multi;
    if (m && m->in_flight > 0)
        return fail(L, "requests are in flight", "error");
    if (m)
        teardown(m);
    lua_pushboolean(L, 1);
    return 1;
}

/* Finalizer of the state that opened the module (runs at lua_close). */
static int l_gc(lua_State *L)
{
    tamarco_host **owner = lua_touserdata(L, 1);
    if (owner && *owner && the_multi && the_multi->host == *owner) {
        teardown(the_multi);
        if (curl_ready) {
            curl_global_cleanup();
            curl_ready = 0;
        }
    }
    return 0;
}

int luaopen_tamarco_c_http_client(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"request", l_request},
        {"stream", l_stream},
        {"stats", l_stats},
        {"shutdown", l_shutdown},
        {NULL, NULL},
    };
    /* uv handles may still call into this module while the host shuts down */
    tamarco_keep_loaded((const void *)luaopen_tamarco_c_http_client);
    register_stream_mt(L);
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    /* module.__gc_owner: a userdata whose finalizer tears the multi down
     * when the main state closes (thread states own no multi). It is made
     * once per state and kept in the registry: a module table dropped from
     * package.loaded (busted does that between spec files) and collected
     * must not tear down the multi in the middle of a run. */
    lua_getfield(L, LUA_REGISTRYINDEX, "tamarco.c.http_client.state_end");
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        tamarco_host **owner = lua_newuserdata(L, sizeof *owner);
        *owner = tamarco_host_of(L);
        lua_createtable(L, 0, 1);
        lua_pushcfunction(L, l_gc);
        lua_setfield(L, -2, "__gc");
        lua_setmetatable(L, -2);
        lua_pushvalue(L, -1);
        lua_setfield(L, LUA_REGISTRYINDEX, "tamarco.c.http_client.state_end");
    }
    lua_setfield(L, -2, "__gc_owner");
    curl_version_info_data *info = curl_version_info(CURLVERSION_NOW);
    lua_pushstring(L, info->version);
    lua_setfield(L, -2, "curl_version");
    lua_pushstring(L, info->ssl_version ? info->ssl_version : "");
    lua_setfield(L, -2, "ssl_version");
    return 1;
}
