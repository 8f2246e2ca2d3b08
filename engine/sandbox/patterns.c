/*
 * patterns: string.find, string.match, string.gmatch and string.gsub for policy scripts, with
 * the Lua 5.1 pattern language exactly as LuaJIT implements it (classes %a %c %d %g %l %p %s %u
 * %w %x %z and their complements, sets, anchors, * + - ?, captures and position captures, %b,
 * %f, back-references %1-%9, ASCII classes independent of the locale, patterns ending at their
 * first NUL byte as in LuaJIT).
 *
 * Why a matcher of our own: backtracking makes matching exponential on patterns such as
 * "(a*)*b", and the stock matcher runs all of it inside one C call, where the count hook never
 * fires. This one counts its work (each pattern item tried, each character scanned, each byte a
 * back-reference compares) and charges it to the call's budget every MS_SANDBOX_WORK_PER_TICK
 * units, so a pathological pattern ends with the sandbox's own "budget exceeded" abort.
 * Plain searches use memmem (linear), where LuaJIT's is quadratic in the worst case.
 */
#define _GNU_SOURCE /* memmem */
#include <string.h>

#include <lauxlib.h>

#include "sandbox/sandbox_lib.h"

#define PAT_ESC        '%'
#define PAT_SPECIALS   "^$*+?.([%-"
#define PAT_MAX_DEPTH  200 /* LuaJIT's LJ_MAX_XLEVEL: deeper is "pattern too complex" */
#define CAP_UNFINISHED (-1)
#define CAP_POSITION   (-2)

/* Character classes, ASCII only, as LuaJIT's lj_char (the locale never matters). */
enum {
    C_CNTRL = 1,
    C_SPACE = 2,
    C_PUNCT = 4,
    C_DIGIT = 8,
    C_XDIGIT = 16,
    C_UPPER = 32,
    C_LOWER = 64,
    C_ALPHA = C_UPPER | C_LOWER,
    C_ALNUM = C_ALPHA | C_DIGIT,
    C_GRAPH = C_ALNUM | C_PUNCT,
};

static const unsigned char ctype[256] = {
    [0 ... 8] = C_CNTRL,
    ['\t' ... '\r'] = C_CNTRL | C_SPACE,
    [14 ... 31] = C_CNTRL,
    [' '] = C_SPACE,
    ['!' ... '/'] = C_PUNCT,
    ['0' ... '9'] = C_DIGIT | C_XDIGIT,
    [':' ... '@'] = C_PUNCT,
    ['A' ... 'F'] = C_UPPER | C_XDIGIT,
    ['G' ... 'Z'] = C_UPPER,
    ['[' ... '`'] = C_PUNCT,
    ['a' ... 'f'] = C_LOWER | C_XDIGIT,
    ['g' ... 'z'] = C_LOWER,
    ['{' ... '~'] = C_PUNCT,
    [127] = C_CNTRL,
};

typedef struct pat_state {
    const char *src_init; /* the subject */
    const char *src_end;
    lua_State *L;
    int level;      /* captures opened so far (finished or not) */
    int depth;      /* nesting of do_match, capped at PAT_MAX_DEPTH */
    ptrdiff_t work; /* units left before the next charge to the budget */
    struct {
        const char *init;
        ptrdiff_t len; /* or CAP_UNFINISHED / CAP_POSITION */
    } capture[LUA_MAXCAPTURES];
} pat_state;

static void pat_init(pat_state *ms, lua_State *L, const char *s, size_t len)
{
    ms->src_init = s;
    ms->src_end = s + len;
    ms->L = L;
    ms->work = MS_SANDBOX_WORK_PER_TICK;
}

/* Charges the work done since the last charge (at least one tick's worth). */
static void __attribute__((noinline)) pat_settle(pat_state *ms)
{
    uint64_t ticks = 1 + (uint64_t)(-ms->work) / MS_SANDBOX_WORK_PER_TICK;
    ms->work = MS_SANDBOX_WORK_PER_TICK;
    ms_sandbox_charge(ms->L, ticks);
}

static inline void pat_spend(pat_state *ms, ptrdiff_t units)
{
    ms->work -= units;
    if (__builtin_expect(ms->work <= 0, 0))
        pat_settle(ms);
}

/* ---- single items --------------------------------------------------------------------------- */

static int match_class(int c, int cl)
{
    int res;
    switch (cl | 0x20) { /* only letters fold onto letters */
    case 'a':
        res = ctype[c] & C_ALPHA;
        break;
    case 'c':
        res = ctype[c] & C_CNTRL;
        break;
    case 'd':
        res = ctype[c] & C_DIGIT;
        break;
    case 'g':
        res = ctype[c] & C_GRAPH;
        break;
    case 'l':
        res = ctype[c] & C_LOWER;
        break;
    case 'p':
        res = ctype[c] & C_PUNCT;
        break;
    case 's':
        res = ctype[c] & C_SPACE;
        break;
    case 'u':
        res = ctype[c] & C_UPPER;
        break;
    case 'w':
        res = ctype[c] & C_ALNUM;
        break;
    case 'x':
        res = ctype[c] & C_XDIGIT;
        break;
    case 'z':
        res = c == 0;
        break;
    default:
        return cl == c;
    }
    return (cl & 0x20) ? res != 0 : res == 0; /* an upper-case class is the complement */
}

/* The end of the single item at p (a char, %x or a [set]). */
static const char *class_end(pat_state *ms, const char *p)
{
    switch (*p++) {
    case PAT_ESC:
        if (*p == '\0')
            luaL_error(ms->L, "malformed pattern (ends with '%%')");
        return p + 1;
    case '[':
        if (*p == '^')
            p++;
        do { /* the first ']' closes, unless escaped; "[]" holds a ']' */
            if (*p == '\0')
                luaL_error(ms->L, "malformed pattern (missing ']')");
            if (*(p++) == PAT_ESC && *p != '\0')
                p++;
        } while (*p != ']');
        return p + 1;
    default:
        return p;
    }
}

/* c against the set [p .. ec], where p is at '[' and ec at the closing ']'. */
static int match_set(int c, const char *p, const char *ec)
{
    int found = 1;
    if (*(p + 1) == '^') {
        found = 0;
        p++;
    }
    while (++p < ec) {
        if (*p == PAT_ESC) {
            p++;
            if (match_class(c, (unsigned char)*p))
                return found;
        } else if (*(p + 1) == '-' && p + 2 < ec) {
            p += 2;
            if ((unsigned char)*(p - 2) <= c && c <= (unsigned char)*p)
                return found;
        } else if ((unsigned char)*p == c) {
            return found;
        }
    }
    return !found;
}

static inline int single_match(int c, const char *p, const char *ep)
{
    switch (*p) {
    case '.':
        return 1;
    case PAT_ESC:
        return match_class(c, (unsigned char)*(p + 1));
    case '[':
        return match_set(c, p, ep - 1);
    default:
        return (unsigned char)*p == c;
    }
}

/* ---- the backtracking matcher ---------------------------------------------------------------- */

static const char *do_match(pat_state *ms, const char *s, const char *p);

static const char *match_balance(pat_state *ms, const char *s, const char *p)
{
    if (*p == '\0' || *(p + 1) == '\0')
        luaL_error(ms->L, "unbalanced pattern");
    if (s >= ms->src_end || *s != *p)
        return NULL;
    int open = *p, close = *(p + 1), depth = 1;
    const char *start = s;
    while (++s < ms->src_end) {
        if (*s == close) {
            if (--depth == 0) {
                pat_spend(ms, (s - start) / 4);
                return s + 1;
            }
        } else if (*s == open) {
            depth++;
        }
    }
    pat_spend(ms, (s - start) / 4);
    return NULL;
}

static const char *max_expand(pat_state *ms, const char *s, const char *p, const char *ep)
{
    ptrdiff_t i = 0;
    while (s + i < ms->src_end && single_match((unsigned char)s[i], p, ep))
        i++;
    pat_spend(ms, i / 4); /* a scanned character costs about a quarter of a matcher step */
    for (; i >= 0; i--) { /* the longest run first, then one shorter each time */
        const char *res = do_match(ms, s + i, ep + 1);
        if (res)
            return res;
    }
    return NULL;
}

static const char *min_expand(pat_state *ms, const char *s, const char *p, const char *ep)
{
    for (;;) {
        const char *res = do_match(ms, s, ep + 1);
        if (res)
            return res;
        if (s < ms->src_end && single_match((unsigned char)*s, p, ep))
            s++;
        else
            return NULL;
    }
}

static const char *start_capture(pat_state *ms, const char *s, const char *p, ptrdiff_t what)
{
    int level = ms->level;
    if (level >= LUA_MAXCAPTURES)
        luaL_error(ms->L, "too many captures");
    ms->capture[level].init = s;
    ms->capture[level].len = what;
    ms->level = level + 1;
    const char *res = do_match(ms, s, p);
    if (!res)
        ms->level--;
    return res;
}

static const char *end_capture(pat_state *ms, const char *s, const char *p)
{
    int l = ms->level - 1;
    while (l >= 0 && ms->capture[l].len != CAP_UNFINISHED)
        l--;
    if (l < 0)
        luaL_error(ms->L, "invalid pattern capture");
    ms->capture[l].len = s - ms->capture[l].init;
    const char *res = do_match(ms, s, p);
    if (!res)
        ms->capture[l].len = CAP_UNFINISHED;
    return res;
}

static int check_capture(pat_state *ms, int digit)
{
    int l = digit - '1';
    if (l < 0 || l >= ms->level || ms->capture[l].len == CAP_UNFINISHED)
        luaL_error(ms->L, "invalid capture index");
    return l;
}

static const char *match_backref(pat_state *ms, const char *s, int digit)
{
    int l = check_capture(ms, digit);
    size_t len = (size_t)ms->capture[l].len;
    pat_spend(ms, (ptrdiff_t)(len / 64)); /* memcmp runs at tens of bytes per nanosecond */
    if ((size_t)(ms->src_end - s) >= len && memcmp(ms->capture[l].init, s, len) == 0)
        return s + len;
    return NULL;
}

static const char *match_frontier(pat_state *ms, const char *s, const char **pp)
{
    const char *p = *pp + 2;
    if (*p != '[')
        luaL_error(ms->L, "missing '[' after '%%f' in pattern");
    const char *ep = class_end(ms, p);
    int prev = (s == ms->src_init) ? 0 : (unsigned char)*(s - 1);
    int next = s < ms->src_end ? (unsigned char)*s : 0; /* the subject's terminating NUL */
    if (match_set(prev, p, ep - 1) || !match_set(next, p, ep - 1))
        return NULL;
    *pp = ep;
    return s;
}

static const char *do_match(pat_state *ms, const char *s, const char *p)
{
    if (++ms->depth > PAT_MAX_DEPTH)
        luaL_error(ms->L, "pattern too complex");
    for (;;) { /* items that need no backtracking loop here instead of recursing */
        pat_spend(ms, 1);
        switch (*p) {
        case '(':
            if (*(p + 1) == ')')
                s = start_capture(ms, s, p + 2, CAP_POSITION);
            else
                s = start_capture(ms, s, p + 1, CAP_UNFINISHED);
            goto done;
        case ')':
            s = end_capture(ms, s, p + 1);
            goto done;
        case '\0':
            goto done;
        case '$':
            if (*(p + 1) != '\0')
                break; /* a '$' elsewhere is a plain character */
            if (s != ms->src_end)
                s = NULL;
            goto done;
        case PAT_ESC:
            if (*(p + 1) == 'b') {
                s = match_balance(ms, s, p + 2);
                if (!s)
                    goto done;
                p += 4;
                continue;
            }
            if (*(p + 1) == 'f') {
                s = match_frontier(ms, s, &p);
                if (!s)
                    goto done;
                continue;
            }
            if (ctype[(unsigned char)*(p + 1)] & C_DIGIT) {
                s = match_backref(ms, s, (unsigned char)*(p + 1));
                if (!s)
                    goto done;
                p += 2;
                continue;
            }
            break;
        default:
            break;
        }
        /* A single item, with or without a quantifier. */
        const char *ep = class_end(ms, p);
        int m = s < ms->src_end && single_match((unsigned char)*s, p, ep);
        switch (*ep) {
        case '?':
            if (m) {
                const char *res = do_match(ms, s + 1, ep + 1);
                if (res) {
                    s = res;
                    goto done;
                }
            }
            p = ep + 1;
            continue;
        case '*':
            s = max_expand(ms, s, p, ep);
            goto done;
        case '+':
            s = m ? max_expand(ms, s + 1, p, ep) : NULL;
            goto done;
        case '-':
            s = min_expand(ms, s, p, ep);
            goto done;
        default:
            if (!m) {
                s = NULL;
                goto done;
            }
            s++;
            p = ep;
            continue;
        }
    }
done:
    ms->depth--;
    return s;
}

/* Runs the matcher at s, from a fresh capture state. */
static const char *match_at(pat_state *ms, const char *s, const char *p)
{
    ms->level = 0;
    ms->depth = 0;
    return do_match(ms, s, p);
}

/* ---- captures -------------------------------------------------------------------------------- */

static void push_capture(pat_state *ms, int i, const char *s, const char *e)
{
    if (i >= ms->level) {
        if (i != 0)
            luaL_error(ms->L, "invalid capture index");
        lua_pushlstring(ms->L, s, (size_t)(e - s)); /* no captures: the whole match */
        return;
    }
    ptrdiff_t l = ms->capture[i].len;
    if (l == CAP_UNFINISHED)
        luaL_error(ms->L, "unfinished capture");
    if (l == CAP_POSITION)
        lua_pushinteger(ms->L, ms->capture[i].init - ms->src_init + 1);
    else
        lua_pushlstring(ms->L, ms->capture[i].init, (size_t)l);
}

/* Pushes the captures (or, with none and s given, the whole match); returns how many. */
static int push_captures(pat_state *ms, const char *s, const char *e)
{
    int n = (ms->level == 0 && s) ? 1 : ms->level;
    luaL_checkstack(ms->L, n, "too many captures");
    for (int i = 0; i < n; i++)
        push_capture(ms, i, s, e);
    return n;
}

/* ---- find / match ---------------------------------------------------------------------------- */

static int has_specials(const char *p, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)p[i];
        if ((ctype[c] & C_PUNCT) && strchr(PAT_SPECIALS, c))
            return 1;
    }
    return 0;
}

/* LuaJIT's (Lua 5.1's) start position: negative counts from the end, past the end clamps. */
static size_t start_offset(lua_State *L, int arg, size_t len)
{
    lua_Integer init = luaL_optinteger(L, arg, 1);
    if (init < 0)
        init += (lua_Integer)len;
    else
        init--;
    if (init < 0)
        return 0;
    return (size_t)init > len ? len : (size_t)init;
}

/* Short needles (the usual case) by memchr and memcmp, which is linear for them and has no
 * set-up cost; long ones by memmem, linear where LuaJIT's loop is quadratic. */
#define PLAIN_SHORT 32

static const char *find_bytes(const char *s, size_t ls, const char *p, size_t lp)
{
    if (lp == 0)
        return s;
    if (lp > ls)
        return NULL;
    if (lp > PLAIN_SHORT)
        return memmem(s, ls, p, lp);
    const char *q = s, *last = s + (ls - lp);
    while (q <= last && (q = memchr(q, (unsigned char)p[0], (size_t)(last - q) + 1)) != NULL) {
        if (memcmp(q + 1, p + 1, lp - 1) == 0)
            return q;
        q++;
    }
    return NULL;
}

static int find_plain(lua_State *L, const char *s, size_t ls, size_t init, const char *p, size_t lp)
{
    const char *q = find_bytes(s + init, ls - init, p, lp);
    if (!q) {
        lua_pushnil(L);
        return 1;
    }
    lua_pushinteger(L, q - s + 1);
    lua_pushinteger(L, q - s + (lua_Integer)lp);
    return 2;
}

static int find_aux(lua_State *L, int find)
{
    size_t ls, lp;
    const char *s = luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checklstring(L, 2, &lp);
    size_t init = start_offset(L, 3, ls);
    if (find && (lua_toboolean(L, 4) || !has_specials(p, lp)))
        return find_plain(L, s, ls, init, p, lp);
    pat_state ms;
    pat_init(&ms, L, s, ls);
    int anchor = *p == '^';
    if (anchor)
        p++;
    const char *src = s + init;
    do {
        const char *e = match_at(&ms, src, p);
        if (e) {
            if (!find)
                return push_captures(&ms, src, e);
            lua_pushinteger(L, src - s + 1);
            lua_pushinteger(L, e - s);
            return push_captures(&ms, NULL, NULL) + 2;
        }
    } while (src++ < ms.src_end && !anchor);
    lua_pushnil(L);
    return 1;
}

static int pat_find(lua_State *L)
{
    return find_aux(L, 1);
}

static int pat_match(lua_State *L)
{
    return find_aux(L, 0);
}

/* ---- gmatch ---------------------------------------------------------------------------------- */

/* Upvalues: subject, pattern, offset of the next try. A '^' is a plain character here, and an
 * empty match moves on by one, as in LuaJIT. */
static int gmatch_next(lua_State *L)
{
    size_t ls;
    const char *s = lua_tolstring(L, lua_upvalueindex(1), &ls);
    const char *p = lua_tostring(L, lua_upvalueindex(2));
    lua_Integer pos = lua_tointeger(L, lua_upvalueindex(3));
    if (pos < 0 || (size_t)pos > ls)
        return 0;
    pat_state ms;
    pat_init(&ms, L, s, ls);
    for (const char *src = s + pos; src <= ms.src_end; src++) {
        const char *e = match_at(&ms, src, p);
        if (e) {
            lua_pushinteger(L, (e - s) + (e == src));
            lua_replace(L, lua_upvalueindex(3));
            return push_captures(&ms, src, e);
        }
    }
    lua_pushinteger(L, (lua_Integer)ls + 1);
    lua_replace(L, lua_upvalueindex(3));
    return 0;
}

static int pat_gmatch(lua_State *L)
{
    luaL_checkstring(L, 1);
    luaL_checkstring(L, 2);
    lua_settop(L, 2);
    lua_pushinteger(L, 0);
    lua_pushcclosure(L, gmatch_next, 3);
    return 1;
}

/* ---- gsub ------------------------------------------------------------------------------------ */

/* Appends the replacement string (argument 3) for the match s..e: %0-%9 are captures, '%' before
 * anything else is that character. Runs of plain text are copied whole. */
static void add_string(pat_state *ms, luaL_Buffer *b, const char *s, const char *e)
{
    size_t l;
    const char *r = lua_tolstring(ms->L, 3, &l);
    const char *end = r + l;
    pat_spend(ms, (ptrdiff_t)(l / 64));
    while (r < end) {
        const char *esc = memchr(r, PAT_ESC, (size_t)(end - r));
        if (!esc) {
            luaL_addlstring(b, r, (size_t)(end - r));
            return;
        }
        luaL_addlstring(b, r, (size_t)(esc - r));
        r = esc + 1; /* LuaJIT reads the terminating NUL after a final '%' as the character */
        if (!(ctype[(unsigned char)*r] & C_DIGIT)) {
            luaL_addchar(b, *r);
        } else if (*r == '0') {
            luaL_addlstring(b, s, (size_t)(e - s));
        } else {
            push_capture(ms, *r - '1', s, e);
            luaL_addvalue(b);
        }
        r++;
    }
}

static void add_value(pat_state *ms, luaL_Buffer *b, const char *s, const char *e, int tr)
{
    lua_State *L = ms->L;
    if (tr == LUA_TNUMBER || tr == LUA_TSTRING) {
        add_string(ms, b, s, e);
        return;
    }
    if (tr == LUA_TFUNCTION) {
        lua_pushvalue(L, 3);
        int n = push_captures(ms, s, e);
        lua_call(L, n, 1);
    } else {
        push_capture(ms, 0, s, e);
        lua_gettable(L, 3);
    }
    if (!lua_toboolean(L, -1)) { /* nil or false: keep the original text */
        lua_pop(L, 1);
        lua_pushlstring(L, s, (size_t)(e - s));
    } else if (!lua_isstring(L, -1)) {
        luaL_error(L, "invalid replacement value (a %s)", luaL_typename(L, -1));
    }
    luaL_addvalue(b);
}

static int pat_gsub(lua_State *L)
{
    size_t ls;
    const char *src = luaL_checklstring(L, 1, &ls);
    const char *p = luaL_checkstring(L, 2);
    int tr = lua_type(L, 3);
    lua_Integer max_n = luaL_optinteger(L, 4, (lua_Integer)ls + 1);
    luaL_argcheck(L,
                  tr == LUA_TNUMBER || tr == LUA_TSTRING || tr == LUA_TFUNCTION || tr == LUA_TTABLE,
                  3, "string/function/table expected");
    int anchor = *p == '^';
    if (anchor)
        p++;
    pat_state ms;
    pat_init(&ms, L, src, ls);
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    lua_Integer n = 0;
    while (n < max_n) {
        const char *e = match_at(&ms, src, p);
        if (e) {
            n++;
            add_value(&ms, &b, src, e, tr);
        }
        if (e && e > src)
            src = e;
        else if (src < ms.src_end)
            luaL_addchar(&b, *src++);
        else
            break;
        if (anchor)
            break;
    }
    luaL_addlstring(&b, src, (size_t)(ms.src_end - src));
    luaL_pushresult(&b);
    lua_pushinteger(L, n);
    return 2;
}

void ms_sandbox_open_patterns(lua_State *L, int strlib)
{
    static const luaL_Reg fns[] = {
        {"find", pat_find},
        {"match", pat_match},
        {"gmatch", pat_gmatch},
        {"gsub", pat_gsub},
    };
    for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++) {
        lua_pushcfunction(L, fns[i].func);
        lua_setfield(L, strlib, fns[i].name);
    }
}
