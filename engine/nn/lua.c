/*
 * nn/lua: the "moonserve.nn" module (docs/nn.md). A model is a full userdata holding the
 * ms_nn_t pointer; __gc frees it. Batch buffers are Lua userdata rather than malloc'd memory,
 * so a Lua error raised half-way through reading the rows (a bad row) leaks nothing, and the
 * replica's memory cap counts them.
 */
#include "nn/internal.h"

#include <lauxlib.h>
#include <string.h>

static const char MODEL_MT[] = "moonserve.nn.model";

static ms_nn_t *check_model(lua_State *L)
{
    ms_nn_t **p = luaL_checkudata(L, 1, MODEL_MT);
    if (!*p)
        luaL_error(L, "nn: the model was freed");
    return *p;
}

/* `path`, or the application's folder (upvalue 1) joined with it when it is relative. */
static const char *resolve_path(lua_State *L, const char *path)
{
    const char *dir = lua_tostring(L, lua_upvalueindex(1));
    if (path[0] == '/' || !dir || !*dir)
        return path;
    return lua_pushfstring(L, "%s/%s", dir, path);
}

static ms_nn_device_t check_device(lua_State *L, int idx)
{
    ms_nn_device_t device = MS_NN_AUTO;
    if (lua_isnoneornil(L, idx))
        return device;
    luaL_checktype(L, idx, LUA_TTABLE);
    for (lua_pushnil(L); lua_next(L, idx); lua_pop(L, 1)) {
        if (lua_type(L, -2) != LUA_TSTRING || strcmp(lua_tostring(L, -2), "device") != 0)
            luaL_error(L, "nn.load: unknown option '%s' (the one option is device)",
                       lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : luaL_typename(L, -2));
    }
    lua_getfield(L, idx, "device");
    if (!lua_isnil(L, -1) &&
        (lua_type(L, -1) != LUA_TSTRING || ms_nn_parse_device(lua_tostring(L, -1), &device) != 0))
        luaL_error(L, "nn.load: device must be \"auto\", \"cpu\" or \"cuda\"");
    lua_pop(L, 1);
    return device;
}

static int l_load(lua_State *L)
{
    lua_settop(L, 2); /* the options at 2, whatever resolve_path pushes above them */
    ms_nn_device_t device = check_device(L, 2);
    const char *path = resolve_path(L, luaL_checkstring(L, 1));
    ms_nn_t **p = lua_newuserdata(L, sizeof *p);
    *p = NULL;
    luaL_getmetatable(L, MODEL_MT);
    lua_setmetatable(L, -2);
    char err[512];
    *p = ms_nn_load(path, device, err, sizeof err);
    if (!*p)
        return luaL_error(L, "nn.load: %s", err);
    return 1;
}

/* Reads the list of rows at index 2 into a userdata buffer left on the stack. */
static float *read_rows(lua_State *L, const ms_nn_t *m, const char *fn, size_t *rows)
{
    luaL_checktype(L, 2, LUA_TTABLE);
    size_t n = lua_objlen(L, 2), width = ms_nn_input_width(m);
    if (n > (size_t)0x7fffffff / width)
        luaL_error(L, "model:%s: %d rows are too many for one batch", fn, (int)n);
    float *buf = lua_newuserdata(L, (n ? n : 1) * width * sizeof(float));
    for (size_t r = 0; r < n; r++) {
        lua_rawgeti(L, 2, (int)r + 1);
        if (lua_type(L, -1) != LUA_TTABLE)
            luaL_error(L, "model:%s: row %d is a %s, not a list of numbers", fn, (int)r + 1,
                       luaL_typename(L, -1));
        if (lua_objlen(L, -1) != width)
            luaL_error(L, "model:%s: row %d has %d values but the model takes %d", fn, (int)r + 1,
                       (int)lua_objlen(L, -1), (int)width);
        for (size_t c = 0; c < width; c++) {
            lua_rawgeti(L, -1, (int)c + 1);
            if (lua_type(L, -1) != LUA_TNUMBER)
                luaL_error(L, "model:%s: row %d, value %d is a %s, not a number", fn, (int)r + 1,
                           (int)c + 1, luaL_typename(L, -1));
            buf[r * width + c] = (float)lua_tonumber(L, -1);
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    *rows = n;
    return buf;
}

/* The scores of every row, in a userdata buffer left on the stack. */
static float *run(lua_State *L, ms_nn_t *m, const char *fn, size_t *rows)
{
    const float *in = read_rows(L, m, fn, rows);
    float *out = lua_newuserdata(L, (*rows ? *rows : 1) * ms_nn_output_width(m) * sizeof(float));
    char err[256];
    if (ms_nn_forward(m, in, *rows, out, err, sizeof err) != 0)
        luaL_error(L, "model:%s: %s", fn, err);
    return out;
}

static int l_forward(lua_State *L)
{
    ms_nn_t *m = check_model(L);
    size_t rows, width = ms_nn_output_width(m);
    const float *out = run(L, m, "forward", &rows);
    lua_createtable(L, (int)rows, 0);
    for (size_t r = 0; r < rows; r++) {
        lua_createtable(L, (int)width, 0);
        for (size_t c = 0; c < width; c++) {
            lua_pushnumber(L, out[r * width + c]);
            lua_rawseti(L, -2, (int)c + 1);
        }
        lua_rawseti(L, -2, (int)r + 1);
    }
    return 1;
}

static int l_predict(lua_State *L)
{
    ms_nn_t *m = check_model(L);
    size_t rows, width = ms_nn_output_width(m);
    const float *out = run(L, m, "predict", &rows);
    lua_createtable(L, (int)rows, 0);
    for (size_t r = 0; r < rows; r++) {
        const float *v = out + r * width;
        size_t best = 0; /* the first of equal maxima, as numpy's argmax */
        for (size_t c = 1; c < width; c++)
            best = v[c] > v[best] ? c : best;
        lua_pushinteger(L, (lua_Integer)best);
        lua_rawseti(L, -2, (int)r + 1);
    }
    return 1;
}

static void set_int(lua_State *L, const char *k, size_t v)
{
    lua_pushinteger(L, (lua_Integer)v);
    lua_setfield(L, -2, k);
}

static void set_str(lua_State *L, const char *k, const char *v)
{
    lua_pushstring(L, v);
    lua_setfield(L, -2, k);
}

static int l_info(lua_State *L)
{
    ms_nn_t *m = check_model(L);
    size_t n = ms_nn_layer_count(m);
    lua_createtable(L, 0, 6);
    set_int(L, "input", ms_nn_input_width(m));
    set_int(L, "output", ms_nn_output_width(m));
    set_str(L, "device", ms_nn_device_name(m));
    set_str(L, "activation", ms_nn_activation_name(m));
    set_str(L, "output_activation", ms_nn_output_name(m));
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        size_t in, out;
        ms_nn_layer_shape(m, i, &in, &out);
        lua_createtable(L, 0, 2);
        set_int(L, "input", in);
        set_int(L, "output", out);
        lua_rawseti(L, -2, (int)i + 1);
    }
    lua_setfield(L, -2, "layers");
    return 1;
}

static int l_gc(lua_State *L)
{
    ms_nn_t **p = luaL_checkudata(L, 1, MODEL_MT);
    ms_nn_free(*p);
    *p = NULL;
    return 0;
}

static int l_tostring(lua_State *L)
{
    ms_nn_t **p = luaL_checkudata(L, 1, MODEL_MT);
    if (!*p)
        lua_pushstring(L, "nn model (freed)");
    else
        lua_pushfstring(L, "nn model %d -> %d, %d layers, %s", (int)ms_nn_input_width(*p),
                        (int)ms_nn_output_width(*p), (int)ms_nn_layer_count(*p),
                        ms_nn_device_name(*p));
    return 1;
}

int ms_nn_lua_open(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"forward", l_forward}, {"predict", l_predict}, {"info", l_info}, {NULL, NULL}};
    if (luaL_newmetatable(L, MODEL_MT)) {
        lua_pushcfunction(L, l_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, l_tostring);
        lua_setfield(L, -2, "__tostring");
        lua_newtable(L);
        luaL_register(L, NULL, methods);
        lua_setfield(L, -2, "__index");
        lua_pushliteral(L, "moonserve.nn.model");
        lua_setfield(L, -2, "__metatable"); /* getmetatable hides it: no swapping __gc */
    }
    lua_pop(L, 1);
    lua_newtable(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushcclosure(L, l_load, 1);
    lua_setfield(L, -2, "load");
    return 1;
}
