/*
 * The exported, FFI-friendly part of the public C API (include/tamarco.h):
 * version, loop, logging from C, waking tickets from any thread, keeping a
 * module loaded. Its Lua side is tamarco.c.native (bindings/native.c);
 * systemd notification is in systemd_notify.c.
 *
 * tamarco_log and tamarco_wake_ticket never call into Lua: they post to the
 * runtime's thread -> loop mailbox (mailbox.h); the loop drains it on its
 * thread, outside any coroutine, where calling Lua is
 * safe. So they work from FFI calls (which must not re-enter the Lua/C API)
 * and from any OS thread.
 */
#include "host.h"
#include "mailbox.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REG_TICKETS "tamarco.native.tickets"   /* ticket -> wait id */

enum { MAIL_LOG, MAIL_WAKE };

typedef struct mail {
    tamarco_mail link;   /* first: the mailbox's list */
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
    tamarco_mailbox box;
    int ready;            /* box initialised */
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
    tamarco_mailbox_post(&mailbox.box, &m->link);
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
    lua_pushstring(L, "tamarco.core.logging");
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

static void on_mail(tamarco_mailbox *box, tamarco_mail *list)
{
    (void)box;
    while (list) {
        mail *m = (mail *)list;
        list = list->next;
        if (mailbox.host && mailbox.host->L) {
            if (m->kind == MAIL_LOG)
                deliver_log(mailbox.host->L, m);
            else
                deliver_wake(mailbox.host, m);
        }
        free(m);
    }
}

int tamarco_native_init(tamarco_host *host)
{
    if (!mailbox.ready) {
        int rc = tamarco_mailbox_init(&mailbox.box, host->loop, on_mail);
        if (rc != 0)
            return rc;
        mailbox.host = host;
        mailbox.ready = 1;
    }
    lua_getfield(host->L, LUA_REGISTRYINDEX, REG_TICKETS);
    if (lua_isnil(host->L, -1)) {
        lua_newtable(host->L);
        lua_setfield(host->L, LUA_REGISTRYINDEX, REG_TICKETS);
    }
    lua_pop(host->L, 1);
    return 0;
}

int tamarco_native_ready(void)
{
    return mailbox.ready;
}

int tamarco_native_new_ticket(void)
{
    int ticket = ++next_ticket;
    if (ticket <= 0)
        ticket = next_ticket = 1;
    return ticket;
}

void tamarco_native_bind_ticket(lua_State *L, int ticket, int wait_id)
{
    lua_getfield(L, LUA_REGISTRYINDEX, REG_TICKETS);
    lua_pushinteger(L, wait_id);
    lua_rawseti(L, -2, ticket);
    lua_pop(L, 1);
}

void tamarco_keep_loaded(const void *symbol)
{
    Dl_info info;
    if (dladdr(symbol, &info) && info.dli_fname)
        dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE);
}
