/*
 * Build tool: precompiles the framework's Lua modules to LuaJIT bytecode for
 * an installed host (host/bytecode_cache.c reads them, read-only).
 *
 *   tamarco_compile_lua STAMP OUT_DIR LUA_DIR FILE...
 *
 * Each FILE under LUA_DIR (e.g. LUA_DIR/tamarco/tasks.lua) becomes
 * OUT_DIR/tamarco%tasks.lua.ljbc, named in tracebacks by its path relative
 * to LUA_DIR ("tamarco/tasks.lua"), which holds wherever the package is
 * installed. STAMP is touched when every file compiled. Exit 1 on any error
 * (a syntax error in the framework fails the build).
 */
#include <lauxlib.h>
#include <lua.h>
#include <lualib.h>

#include <stdio.h>
#include <string.h>

static int write_chunk(lua_State *L, const void *p, size_t size, void *ud)
{
    (void)L;
    return fwrite(p, 1, size, ud) == size ? 0 : 1;
}

static int compile(lua_State *L, const char *out_dir, const char *lua_dir, const char *file)
{
    size_t dir_len = strlen(lua_dir);
    if (strncmp(file, lua_dir, dir_len) != 0 || file[dir_len] != '/') {
        fprintf(stderr, "compile_lua: %s is not under %s\n", file, lua_dir);
        return 1;
    }
    const char *relative = file + dir_len + 1;

    FILE *in = fopen(file, "rb");
    if (!in) {
        perror(file);
        return 1;
    }
    luaL_Buffer source;
    luaL_buffinit(L, &source);
    size_t n;
    do {
        char *p = luaL_prepbuffer(&source);
        n = fread(p, 1, LUAL_BUFFERSIZE, in);
        luaL_addsize(&source, n);
    } while (n == LUAL_BUFFERSIZE);
    fclose(in);
    luaL_pushresult(&source);
    size_t len;
    const char *text = lua_tolstring(L, -1, &len);

    char chunk_name[4200];
    snprintf(chunk_name, sizeof chunk_name, "@%s", relative);
    if (luaL_loadbuffer(L, text, len, chunk_name) != 0) {
        fprintf(stderr, "compile_lua: %s\n", lua_tostring(L, -1));
        return 1;
    }

    char out_path[8400];
    int k = snprintf(out_path, sizeof out_path, "%s/", out_dir);
    for (const char *c = relative; *c && k < (int)sizeof out_path - 6; c++)
        out_path[k++] = *c == '/' ? '%' : *c;
    snprintf(out_path + k, sizeof out_path - (size_t)k, ".ljbc");
    FILE *out = fopen(out_path, "wb");
    if (!out) {
        perror(out_path);
        return 1;
    }
    int failed = lua_dump(L, write_chunk, out) != 0;
    failed |= fclose(out) != 0;
    if (failed)
        fprintf(stderr, "compile_lua: cannot write %s\n", out_path);
    lua_settop(L, 0);
    return failed;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s STAMP OUT_DIR LUA_DIR FILE...\n", argv[0]);
        return 2;
    }
    lua_State *L = luaL_newstate();
    if (!L)
        return 1;
    int failed = 0;
    for (int i = 4; i < argc && !failed; i++)
        failed = compile(L, argv[2], argv[3], argv[i]);
    lua_close(L);
    if (failed)
        return 1;
    FILE *stamp = fopen(argv[1], "w");
    if (!stamp) {
        perror(argv[1]);
        return 1;
    }
    fclose(stamp);
    return 0;
}
