/*
 * The exported, FFI-friendly part of the public C API (include/tamarco.h):
 * version, loop, logging from C, waking tickets from any thread, systemd
 * notifications; and tamarco.c.native, its Lua side (used by
 * lua/tamarco/native.lua and lua/tamarco/systemd.lua).
 *
 * tamarco_log and tamarco_wake_ticket never call into Lua: they append to a
 * mailbox (a mutex-protected list) and signal a uv_async_t; the loop drains
 * the mailbox on its thread, outside any coroutine, where calling Lua is
 * safe. So they work from FFI calls (which must not re-enter the Lua/C API)
 * and from any OS thread.
 */
#include "host.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef TAMARCO_RELATIVE_CMAKEDIR   /* set by CMakeLists.txt */
#define TAMARCO_RELATIVE_CMAKEDIR "lib/cmake/TamarcoHost"
#endif

#define REG_TICKETS "tamarco.native.tickets"   /* ticket -> wait id */

enum { MAIL_LOG, MAIL_WAKE };

typedef struct mail {
    struct mail *next;
    int kind;
    int level;      /* MAIL_LOG */
    int ticket;     /* MAIL_WAKE */
    int ok;
    int has_data;
    size_t len;
    char *logger;   /* MAIL_LOG: points into text */
    char text[];    /* data (MAIL_WAKE) or logger NUL message NUL (MAIL_LOG) */
} mail;

static struct {
    tamarco_host *host;   /* the main state's host, once tamarco.c.native is opened */
    uv_async_t async;
    uv_mutex_t lock;
    mail *head, *tail;
    int ready;            /* async and lock initialised */
} mailbox;

static int next_ticket;

TAMARCO_API const char *tamarco_version(void)
{
    return TAMARCO_VERSION;
}

TAMARCO_API uv_loop_t *tamarco_loop(void)
{
    return mailbox.host ? mailbox.host->loop : uv_default_loop();
}

static const char *level_name(int level)
{
    if (level >= TAMARCO_LOG_CRITICAL) return "CRITICAL";
    if (level >= TAMARCO_LOG_ERROR) return "ERROR";
    if (level >= TAMARCO_LOG_WARNING) return "WARNING";
    if (level >= TAMARCO_LOG_INFO) return "INFO";
    return "DEBUG";
}

static void post(mail *m)
{
    m->next = NULL;
    uv_mutex_lock(&mailbox.lock);
    if (mailbox.tail)
        mailbox.tail->next = m;
    else
        mailbox.head = m;
    mailbox.tail = m;
    uv_mutex_unlock(&mailbox.lock);
    uv_async_send(&mailbox.async);
}

TAMARCO_API int tamarco_log(int level, const char *logger, const char *message)
{
    if (!logger || !*logger)
        logger = "native";
    if (!message)
        message = "";
    if (!mailbox.ready) {
        fprintf(stderr, "%s %s: %s\n", level_name(level), logger, message);
        return 0;
    }
    size_t logger_len = strlen(logger), message_len = strlen(message);
    mail *m = malloc(sizeof *m + logger_len + message_len + 2);
    if (!m)
        return -ENOMEM;
    m->kind = MAIL_LOG;
    m->level = level;
    memcpy(m->text, message, message_len + 1);
    m->logger = m->text + message_len + 1;
    memcpy(m->logger, logger, logger_len + 1);
    m->len = message_len;
    post(m);
    return 0;
}

TAMARCO_API int tamarco_wake_ticket(int ticket, int ok, const char *data, size_t len)
{
    if (!mailbox.ready)
        return -ENOENT;
    if (!data)
        len = 0;
    mail *m = malloc(sizeof *m + len + 1);
    if (!m)
        return -ENOMEM;
    m->kind = MAIL_WAKE;
    m->ticket = ticket;
    m->ok = ok;
    m->has_data = data != NULL;
    m->len = len;
    if (len)
        memcpy(m->text, data, len);
    m->text[len] = '\0';
    post(m);
    return 0;
}

/* ---- draining the mailbox on the loop ---- */

static int traceback_handler(lua_State *L)
{
    luaL_traceback(L, L, lua_tostring(L, 1), 1);
    return 1;
}

static void deliver_log(lua_State *L, const mail *m)
{
    int top = lua_gettop(L);
    lua_pushcfunction(L, traceback_handler);
    lua_getglobal(L, "require");
    lua_pushstring(L, "tamarco.logging");
    if (lua_pcall(L, 1, 1, top + 1) == 0) {
        lua_getfield(L, -1, "get_logger");
        lua_pushstring(L, m->logger);
        if (lua_pcall(L, 1, 1, top + 1) == 0) {
            lua_getfield(L, -1, "log");
            lua_insert(L, -2);   /* log, logger */
            lua_pushstring(L, level_name(m->level));
            lua_pushlstring(L, m->text, m->len);
            if (lua_pcall(L, 3, 0, top + 1) == 0) {
                lua_settop(L, top);
                return;
            }
        }
    }
    fprintf(stderr, "%s %s: %s (logging failed: %s)\n", level_name(m->level), m->logger, m->text,
            lua_tostring(L, -1));
    lua_settop(L, top);
}

static int push_ticket_result(lua_State *co, void *ud)
{
    const mail *m = ud;
    if (m->ok) {
        if (m->has_data)
            lua_pushlstring(co, m->text, m->len);
        else
            lua_pushnil(co);
        return 1;
    }
    lua_pushnil(co);
    lua_pushlstring(co, m->text, m->len);
    return 2;
}

static void deliver_wake(tamarco_host *host, const mail *m)
{
    lua_State *L = host->L;
    lua_getfield(L, LUA_REGISTRYINDEX, REG_TICKETS);
    if (!lua_istable(L, -1)) {
        lua_pop(L, 1);
        return;
    }
    lua_rawgeti(L, -1, m->ticket);
    int wait_id = (int)lua_tointeger(L, -1);
    lua_pop(L, 1);
    if (wait_id) {
        lua_pushnil(L);
        lua_rawseti(L, -2, m->ticket);
    }
    lua_pop(L, 1);
    if (wait_id)
        tamarco_wake(host, wait_id, push_ticket_result, (void *)m);
}

static void on_mail(uv_async_t *async)
{
    (void)async;
    uv_mutex_lock(&mailbox.lock);
    mail *m = mailbox.head;
    mailbox.head = mailbox.tail = NULL;
    uv_mutex_unlock(&mailbox.lock);
    while (m) {
        mail *next = m->next;
        if (mailbox.host && mailbox.host->L) {
            if (m->kind == MAIL_LOG)
                deliver_log(mailbox.host->L, m);
            else
                deliver_wake(mailbox.host, m);
        }
        free(m);
        m = next;
    }
}

static int mailbox_init(tamarco_host *host)
{
    if (mailbox.ready)
        return 0;
    int rc = uv_mutex_init(&mailbox.lock);
    if (rc != 0)
        return rc;
    rc = uv_async_init(host->loop, &mailbox.async, on_mail);
    if (rc != 0) {
        uv_mutex_destroy(&mailbox.lock);
        return rc;
    }
    /* the mailbox alone must not keep the loop (and a stopping host) alive */
    uv_unref((uv_handle_t *)&mailbox.async);
    mailbox.host = host;
    mailbox.ready = 1;
    return 0;
}

/* ---- systemd ---- */

TAMARCO_API int tamarco_sd_notify(const char *state)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (!path || !*path)
        return 0;
    if (!state)
        return -EINVAL;
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    size_t path_len = strlen(path);
    if (path_len >= sizeof addr.sun_path || (path[0] != '/' && path[0] != '@'))
        return -EINVAL;
    memcpy(addr.sun_path, path, path_len);
    if (path[0] == '@')   /* abstract namespace */
        addr.sun_path[0] = '\0';
    socklen_t addr_len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + path_len);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    ssize_t sent = sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&addr, addr_len);
    int err = errno;
    close(fd);
    return sent < 0 ? -err : 1;
}

/* ---- tamarco.c.native ---- */

static void cancel_ticket(void *ud)
{
    /* The waiting task went away; a later tamarco_wake_ticket finds the
     * wait gone (tamarco_wake returns 0). Nothing else holds resources. */
    (void)ud;
}

/* wait(fn) -> values given to tamarco_wake_ticket. Calls fn(ticket) (which
 * hands the ticket to C code, e.g. through the FFI) and suspends the task
 * until tamarco_wake_ticket(ticket, ...) is called from any thread. The
 * wait is registered only after fn returned, so an error in fn leaves
 * nothing behind. */
static int l_wait(lua_State *L)
{
    tamarco_host *host = tamarco_host_of(L);
    luaL_checktype(L, 1, LUA_TFUNCTION);
    if (!host || !mailbox.ready)
        return luaL_error(L, "tamarco.native.wait is only available in tasks of the service's main state");
    if (!tamarco_in_task(L))
        return luaL_error(L, "tamarco.native.wait yields: call it inside a task, hook or handler");
    int ticket = ++next_ticket;
    if (ticket <= 0)
        ticket = next_ticket = 1;
    lua_pushvalue(L, 1);
    lua_pushinteger(L, ticket);
    lua_call(L, 1, 0);
    int wait_id = tamarco_wait_begin(L, cancel_ticket, NULL);
    tamarco_wait_note(tamarco_host_of(L), wait_id, "native", NULL, 0);
    lua_getfield(L, LUA_REGISTRYINDEX, REG_TICKETS);
    lua_pushinteger(L, wait_id);
    lua_rawseti(L, -2, ticket);
    lua_pop(L, 1);
    return tamarco_wait_yield(L);
}

/* sd_notify(state) -> 1 sent | 0 no NOTIFY_SOCKET | nil, message */
static int l_sd_notify(lua_State *L)
{
    int rc = tamarco_sd_notify(luaL_checkstring(L, 1));
    if (rc < 0) {
        lua_pushnil(L);
        lua_pushstring(L, strerror(-rc));
        return 2;
    }
    lua_pushinteger(L, rc);
    return 1;
}

/* log(level, logger, message): tamarco_log from Lua (for tests). */
static int l_log(lua_State *L)
{
    int rc = tamarco_log((int)luaL_checkinteger(L, 1), luaL_optstring(L, 2, NULL), luaL_checkstring(L, 3));
    lua_pushboolean(L, rc == 0);
    return 1;
}

/* wake_ticket(ticket, ok, data): tamarco_wake_ticket from Lua (for tests). */
static int l_wake_ticket(lua_State *L)
{
    size_t len = 0;
    const char *data = luaL_optlstring(L, 3, NULL, &len);
    lua_pushinteger(L, tamarco_wake_ticket((int)luaL_checkinteger(L, 1), lua_toboolean(L, 2), data, len));
    return 1;
}

/* ---- a C offload for tests: sleep on the pool, return the thread's id ---- */

typedef struct sleep_job {
    unsigned ms;
    int on_loop_thread;
    int overlapping;          /* probe jobs running at once, this one included */
    uv_thread_t loop_thread;
} sleep_job;

/* How many probe jobs are sleeping on pool threads right now: lets a spec
 * see that offloads overlap without timing them. */
static int sleeping_jobs;

static void sleep_work(void *ud)
{
    sleep_job *job = ud;
    int now = __atomic_add_fetch(&sleeping_jobs, 1, __ATOMIC_SEQ_CST);
    uv_sleep(job->ms);
    int at_end = __atomic_load_n(&sleeping_jobs, __ATOMIC_SEQ_CST);
    job->overlapping = now > at_end ? now : at_end;
    __atomic_sub_fetch(&sleeping_jobs, 1, __ATOMIC_SEQ_CST);
    uv_thread_t self = uv_thread_self();
    job->on_loop_thread = uv_thread_equal(&self, &job->loop_thread);
}

static int sleep_done(lua_State *co, void *ud)
{
    sleep_job *job = ud;
    int n = 0;
    if (co) {
        lua_pushboolean(co, !job->on_loop_thread);
        lua_pushinteger(co, job->overlapping);
        n = 2;
    }
    free(job);
    return n;
}

/* offload_sleep(ms) -> ran_off_the_loop_thread, overlapping. Blocks a pool thread for ms
 * milliseconds while the task yields. */
static int l_offload_sleep(lua_State *L)
{
    lua_Integer ms = luaL_checkinteger(L, 1);
    luaL_argcheck(L, ms >= 0, 1, "must be >= 0");
    sleep_job *job = malloc(sizeof *job);
    if (!job)
        return luaL_error(L, "out of memory");
    job->ms = (unsigned)ms;
    job->on_loop_thread = 1;
    job->loop_thread = uv_thread_self();
    return tamarco_offload(L, sleep_work, sleep_done, job);
}

int luaopen_tamarco_c_native(lua_State *L)
{
    static const luaL_Reg funcs[] = {
        {"wait", l_wait},
        {"sd_notify", l_sd_notify},
        {"log", l_log},
        {"wake_ticket", l_wake_ticket},
        {"offload_sleep", l_offload_sleep},
        {NULL, NULL},
    };
    tamarco_host *host = tamarco_host_of(L);
    if (host) {
        int rc = mailbox_init(host);
        if (rc != 0)
            return luaL_error(L, "tamarco.c.native: cannot initialise the mailbox: %s", uv_strerror(rc));
        lua_getfield(L, LUA_REGISTRYINDEX, REG_TICKETS);
        if (lua_isnil(L, -1)) {
            lua_newtable(L);
            lua_setfield(L, LUA_REGISTRYINDEX, REG_TICKETS);
        }
        lua_pop(L, 1);
    }
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    lua_pushstring(L, TAMARCO_VERSION);
    lua_setfield(L, -2, "version");
    lua_pushinteger(L, TAMARCO_API_VERSION);
    lua_setfield(L, -2, "api_version");
    lua_pushstring(L, TAMARCO_RELATIVE_CMAKEDIR);
    lua_setfield(L, -2, "relative_cmake_dir");
    return 1;
}

void tamarco_keep_loaded(const void *symbol)
{
    Dl_info info;
    if (dladdr(symbol, &info) && info.dli_fname)
        dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}
