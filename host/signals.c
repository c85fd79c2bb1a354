/*
 * The process's signals. The host owns one uv_signal_t per signal that Lua
 * listens to, started while someone listens and stopped (the default
 * disposition back) when nobody does. A signal reaches Lua through the
 * scheduler, in one of two ways:
 *   - a listener (tamarco_signal_listen): its function runs as a new task
 *     with the signal's name, once per delivery, in registration order;
 *   - a waiting task (tamarco_signal_wait): its wait ends with the name.
 * What a signal means (stop, reload, forward to workers) is Lua's policy;
 * tamarco.c.process binds these calls (on_signal, wait_signal).
 */
#include "host.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const struct {
    const char *name;
    int signum;
} KNOWN[] = {
    {"SIGHUP", SIGHUP},   {"SIGINT", SIGINT},   {"SIGQUIT", SIGQUIT},   {"SIGTERM", SIGTERM},
    {"SIGUSR1", SIGUSR1}, {"SIGUSR2", SIGUSR2}, {"SIGCHLD", SIGCHLD}, {"SIGWINCH", SIGWINCH},
};
#define KNOWN_COUNT ((int)(sizeof KNOWN / sizeof KNOWN[0]))


typedef struct listener {
    int id;
    int ref;      /* the function, in the registry */
} listener;

typedef struct signal_watch {
    uv_signal_t handle;
    struct tamarco_signals *owner;
    int sig;               /* index in KNOWN */
    int initialised, active;
    listener *listeners;   /* in registration order */
    int count, cap;
} signal_watch;

/* A task waiting in tamarco_signal_wait for any of the signals in `mask`. */
typedef struct signal_waiter {
    struct tamarco_signals *owner;
    int wait_id;
    unsigned mask;         /* bit i: KNOWN[i] */
    struct signal_waiter *next;
} signal_waiter;

struct tamarco_signals {
    tamarco_host *host;
    signal_watch watch[KNOWN_COUNT];
    signal_waiter *waiters;
    int next_listener_id;
    int open_handles;      /* freed when the last one is closed */
    int closing;
};

int tamarco_signal_find(const char *name)
{
    for (int i = 0; i < KNOWN_COUNT; i++) {
        if (strcmp(KNOWN[i].name, name) == 0)
            return i;
    }
    return -1;
}

const char *tamarco_signal_names(void)
{
    return "SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGCHLD, SIGWINCH";
}

static struct tamarco_signals *signals_of(tamarco_host *host)
{
    if (!host->signals) {
        struct tamarco_signals *s = calloc(1, sizeof *s);
        if (!s)
            return NULL;
        s->host = host;
        for (int i = 0; i < KNOWN_COUNT; i++) {
            s->watch[i].owner = s;
            s->watch[i].sig = i;
        }
        host->signals = s;
    }
    return host->signals;
}

static int is_wanted(struct tamarco_signals *s, int sig)
{
    if (s->watch[sig].count > 0)
        return 1;
    for (signal_waiter *w = s->waiters; w; w = w->next) {
        if (w->mask & (1u << sig))
            return 1;
    }
    return 0;
}

static void on_signal(uv_signal_t *handle, int signum);

/* Starts or stops the handle of `sig` so that it runs exactly while it has
 * a listener or a waiter. Returns 0 or a libuv error. */
static int sync_watch(struct tamarco_signals *s, int sig)
{
    signal_watch *w = &s->watch[sig];
    int wanted = is_wanted(s, sig);
    if (wanted == w->active)
        return 0;
    if (!wanted) {
        uv_signal_stop(&w->handle);   /* restores the default disposition */
        w->active = 0;
        return 0;
    }
    if (!w->initialised) {
        int rc = uv_signal_init(s->host->loop, &w->handle);
        if (rc != 0)
            return rc;
        w->handle.data = w;
        w->initialised = 1;
        s->open_handles++;
    }
    int rc = uv_signal_start(&w->handle, on_signal, KNOWN[sig].signum);
    if (rc == 0)
        w->active = 1;
    return rc;
}

static int push_name(lua_State *co, void *ud)
{
    lua_pushstring(co, ud);
    return 1;
}

static void on_signal(uv_signal_t *handle, int signum)
{
    (void)signum;
    signal_watch *w = handle->data;
    struct tamarco_signals *s = w->owner;
    tamarco_host *host = s->host;
    lua_State *L = host->L;
    const char *name = KNOWN[w->sig].name;
    unsigned bit = 1u << w->sig;

    /* Every listener's function first: a listener that closes listeners
     * (its own or another's) changes the list for the next delivery, not
     * for this one. */
    int top = lua_gettop(L);
    int n = lua_checkstack(L, w->count + 3) ? w->count : 0;
    for (int i = 0; i < n; i++)
        lua_rawgeti(L, LUA_REGISTRYINDEX, w->listeners[i].ref);
    for (int i = 0; i < n; i++) {
        lua_pushvalue(L, top + 1 + i);
        lua_pushstring(L, name);
        tamarco_start_task(host, 1);
    }
    lua_settop(L, top);

    /* The waiting tasks: taken out of the list before any of them runs (a
     * woken task may wait again, for the next delivery). */
    signal_waiter *woken = NULL, **link = &s->waiters;
    while (*link) {
        signal_waiter *waiter = *link;
        if (waiter->mask & bit) {
            *link = waiter->next;
            waiter->next = woken;
            woken = waiter;
        } else {
            link = &waiter->next;
        }
    }
    unsigned others = 0;
    while (woken) {
        signal_waiter *waiter = woken;
        woken = waiter->next;
        others |= waiter->mask;
        int id = waiter->wait_id;
        free(waiter);
        tamarco_wake(host, id, push_name, (void *)name);
    }
    /* the signals the woken tasks also waited for may have nobody left */
    for (int i = 0; i < KNOWN_COUNT; i++) {
        if ((others | bit) & (1u << i))
            sync_watch(s, i);
    }
}

int tamarco_signal_listen(tamarco_host *host, lua_State *L, int sig, int fn_index)
{
    struct tamarco_signals *s = signals_of(host);
    if (!s)
        return UV_ENOMEM;
    signal_watch *w = &s->watch[sig];
    if (w->count == w->cap) {
        int cap = w->cap ? w->cap * 2 : 4;
        listener *grown = realloc(w->listeners, (size_t)cap * sizeof *grown);
        if (!grown)
            return UV_ENOMEM;
        w->listeners = grown;
        w->cap = cap;
    }
    lua_pushvalue(L, fn_index);
    listener *l = &w->listeners[w->count++];
    l->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    l->id = ++s->next_listener_id;
    int rc = sync_watch(s, sig);
    if (rc != 0) {
        tamarco_signal_unlisten(host, sig, l->id);
        return rc;
    }
    return s->next_listener_id;
}

void tamarco_signal_unlisten(tamarco_host *host, int sig, int id)
{
    struct tamarco_signals *s = host->signals;
    if (!s || s->closing)
        return;
    signal_watch *w = &s->watch[sig];
    for (int i = 0; i < w->count; i++) {
        if (w->listeners[i].id == id) {
            luaL_unref(host->L, LUA_REGISTRYINDEX, w->listeners[i].ref);
            memmove(&w->listeners[i], &w->listeners[i + 1], (size_t)(w->count - i - 1) * sizeof *w->listeners);
            w->count--;
            sync_watch(s, sig);
            return;
        }
    }
}

/* The waiting task was cancelled (or the host shuts down). */
static void cancel_wait(void *ud)
{
    signal_waiter *waiter = ud;
    struct tamarco_signals *s = waiter->owner;
    for (signal_waiter **link = &s->waiters; *link; link = &(*link)->next) {
        if (*link == waiter) {
            *link = waiter->next;
            break;
        }
    }
    unsigned mask = waiter->mask;
    free(waiter);
    if (s->closing)
        return;
    for (int i = 0; i < KNOWN_COUNT; i++) {
        if (mask & (1u << i))
            sync_watch(s, i);
    }
}

int tamarco_signal_wait(lua_State *L, const int *sigs, int n)
{
    tamarco_host *host = tamarco_host_of(L);
    struct tamarco_signals *s = signals_of(host);
    signal_waiter *waiter = s ? malloc(sizeof *waiter) : NULL;
    if (!waiter)
        return luaL_error(L, "out of memory");
    waiter->owner = s;
    waiter->mask = 0;
    for (int i = 0; i < n; i++)
        waiter->mask |= 1u << sigs[i];
    waiter->next = s->waiters;
    s->waiters = waiter;
    for (int i = 0; i < KNOWN_COUNT; i++) {
        int rc = (waiter->mask & (1u << i)) ? sync_watch(s, i) : 0;
        if (rc != 0) {
            cancel_wait(waiter);   /* also stops the handles started above */
            return luaL_error(L, "cannot watch %s: %s", KNOWN[i].name, uv_strerror(rc));
        }
    }
    waiter->wait_id = tamarco_wait_begin(L, cancel_wait, waiter);
    char detail[TAMARCO_WAIT_DETAIL_MAX] = "";
    for (int i = 0; i < KNOWN_COUNT; i++) {
        if (waiter->mask & (1u << i)) {
            size_t used = strlen(detail);
            snprintf(detail + used, sizeof detail - used, "%s%s", used ? " " : "", KNOWN[i].name);
        }
    }
    tamarco_wait_note(host, waiter->wait_id, "signal", detail, 0);
    return tamarco_wait_yield(L);
}

static void on_closed(uv_handle_t *handle)
{
    signal_watch *w = handle->data;
    struct tamarco_signals *s = w->owner;
    free(w->listeners);
    w->listeners = NULL;
    if (--s->open_handles == 0)
        free(s);
}

void tamarco_signals_close(tamarco_host *host)
{
    struct tamarco_signals *s = host->signals;
    if (!s)
        return;
    host->signals = NULL;
    s->closing = 1;
    while (s->waiters) {   /* the scheduler's shutdown cancelled them already */
        signal_waiter *waiter = s->waiters;
        s->waiters = waiter->next;
        free(waiter);
    }
    int handles = s->open_handles;
    for (int i = 0; i < KNOWN_COUNT; i++) {
        signal_watch *w = &s->watch[i];
        if (w->initialised)
            uv_close((uv_handle_t *)&w->handle, on_closed);
        else
            free(w->listeners);
    }
    if (handles == 0)
        free(s);
}
