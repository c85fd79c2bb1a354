/*
 * A bytecode cache for the framework's own Lua modules: loading LuaJIT
 * bytecode takes a tenth of parsing the source, and start-up time is one
 * of the host's promises. Any failure falls back to the source. How it is
 * keyed and where it lives: docs/internals/bytecode-cache.md.
 */
#include "host.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define REG_CACHE_DIR "tamarco.bytecode_cache.dir"
#define REG_CACHE_READ_ONLY "tamarco.bytecode_cache.read_only"

static int newer_or_same(const struct stat *a, const struct stat *b)
{
    if (a->st_mtim.tv_sec != b->st_mtim.tv_sec)
        return a->st_mtim.tv_sec > b->st_mtim.tv_sec;
    return a->st_mtim.tv_nsec >= b->st_mtim.tv_nsec;
}

static int write_chunk(lua_State *L, const void *p, size_t size, void *ud)
{
    return fwrite(p, 1, size, ud) == size ? 0 : 1;
}

/* Writes the function on top of the stack as bytecode to `path`. */
static void store(lua_State *L, const char *path)
{
    char tmp[8500];
    snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, (long)getpid());
    FILE *f = fopen(tmp, "wb");
    if (!f)
        return;
    int failed = lua_dump(L, write_chunk, f) != 0;
    failed |= fclose(f) != 0;
    if (failed || rename(tmp, path) != 0)
        unlink(tmp);
}

/* package.loaders entry: returns the loaded chunk, or a message. */
static int search(lua_State *L)
{
    const char *name = luaL_checkstring(L, 1);
    lua_getfield(L, LUA_REGISTRYINDEX, REG_CACHE_DIR);
    const char *cache_dir = lua_tostring(L, -1);
    lua_getfield(L, LUA_REGISTRYINDEX, REG_CACHE_READ_ONLY);
    int read_only = lua_toboolean(L, -1);
    lua_pop(L, 1);
    tamarco_host *host = tamarco_host_of(L);
    if (!cache_dir || !host)
        return 0;

    /* the source, where Lua's own searcher would find it */
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "searchpath");
    lua_pushstring(L, name);
    lua_getfield(L, -3, "path");
    lua_call(L, 2, 1);
    const char *source = lua_tostring(L, -1);
    size_t dir_len = strlen(host->lua_dir);
    if (!source || strncmp(source, host->lua_dir, dir_len) != 0 || source[dir_len] != '/') {
        lua_pushfstring(L, "\n\tno cached bytecode for '%s'", name);
        return 1;
    }
    /* writable: keyed by the source's path, so that hosts pointed at other
     * Lua trees (TAMARCO_LUA_DIR) share the directory without mixing their
     * modules; read-only: by the path below the Lua directory */
    const char *key = read_only ? source + dir_len + 1 : source;
    char cached[8400];
    int n = snprintf(cached, sizeof cached, "%s/", cache_dir);
    for (const char *c = key; *c && n < (int)sizeof cached - 6; c++)
        cached[n++] = *c == '/' ? '%' : *c;
    snprintf(cached + n, sizeof cached - (size_t)n, ".ljbc");

    struct stat source_stat, cached_stat;
    if (stat(source, &source_stat) == 0 && stat(cached, &cached_stat) == 0
        && cached_stat.st_size > 0 && newer_or_same(&cached_stat, &source_stat)) {
        if (luaL_loadfile(L, cached) == 0)
            return 1;
        lua_pop(L, 1);   /* unreadable or from another LuaJIT: rebuild it */
    }
    if (luaL_loadfile(L, source) != 0)
        return lua_error(L);   /* a syntax error in the framework: say it */
    if (!read_only)
        store(L, cached);
    return 1;
}

int tamarco_bytecode_cache_install(lua_State *L, const char *cache_dir, int read_only)
{
    struct stat st;
    if (stat(cache_dir, &st) != 0 || !S_ISDIR(st.st_mode))
        return 0;
    if (!read_only && access(cache_dir, W_OK) != 0)
        return 0;
    lua_pushstring(L, cache_dir);
    lua_setfield(L, LUA_REGISTRYINDEX, REG_CACHE_DIR);
    lua_pushboolean(L, read_only);
    lua_setfield(L, LUA_REGISTRYINDEX, REG_CACHE_READ_ONLY);
    /* package.loaders: 1 preload, 2 Lua files, 3 C, 4 all-in-one; ours goes
     * before the Lua file searcher */
    lua_getglobal(L, "table");
    lua_getfield(L, -1, "insert");
    lua_getglobal(L, "package");
    lua_getfield(L, -1, "loaders");
    lua_remove(L, -2);
    lua_pushinteger(L, 2);
    lua_pushcfunction(L, search);
    lua_call(L, 3, 0);
    lua_pop(L, 1);
    return 1;
}
