/*
 * Views into Redis Streams replies (broker.h). Redis 6.2 and 7 differ only in XAUTOCLAIM (7 adds
 * a third element, the ids of deleted entries, and leaves those out of the entry list; 6.2 lists
 * them with nil fields), which both readers here accept.
 */
#include <string.h>

#include "broker/broker.h"

static int is_array(const redisReply *r)
{
    return r && r->type == REDIS_REPLY_ARRAY;
}

static long entry_list(const redisReply *list, const redisReply **out)
{
    if (!is_array(list))
        return -1;
    *out = list;
    return (long)list->elements;
}

long ms_broker_stream_entries(const redisReply *r, const redisReply **list)
{
    *list = NULL;
    if (r && r->type == REDIS_REPLY_NIL)
        return 0;
    /* [[stream, entries], ...]; an entry list ([[id, fields], ...], as XRANGE sends) has the
     * same outer shape, and is told apart by its fields being strings, not entries */
    if (!is_array(r) || r->elements == 0 || !is_array(r->element[0]) ||
        r->element[0]->elements != 2 || r->element[0]->element[0]->type != REDIS_REPLY_STRING)
        return -1;
    const redisReply *entries = r->element[0]->element[1];
    if (is_array(entries) && entries->elements > 0 && !is_array(entries->element[0]))
        return -1;
    return entry_list(entries, list);
}

long ms_broker_autoclaim_entries(const redisReply *r, const redisReply **list, const char **cursor,
                                 size_t *cursor_len)
{
    *list = NULL;
    if (!is_array(r) || r->elements < 2 || r->element[0]->type != REDIS_REPLY_STRING)
        return -1;
    *cursor = r->element[0]->str;
    *cursor_len = r->element[0]->len;
    return entry_list(r->element[1], list);
}

int ms_broker_entry(const redisReply *list, size_t i, ms_broker_entry_t *out)
{
    memset(out, 0, sizeof *out);
    if (!is_array(list) || i >= list->elements)
        return -1;
    const redisReply *e = list->element[i];
    if (!is_array(e) || e->elements != 2 || e->element[0]->type != REDIS_REPLY_STRING)
        return -1;
    out->id = e->element[0]->str;
    out->id_len = e->element[0]->len;
    const redisReply *f = e->element[1];
    if (f->type == REDIS_REPLY_NIL)
        return 0;
    if (!is_array(f) || f->elements % 2 != 0)
        return -1;
    out->fields = f;
    out->n_fields = f->elements / 2;
    return 0;
}

const redisReply *ms_broker_entry_field(const ms_broker_entry_t *e, const char *name,
                                        size_t name_len)
{
    for (size_t i = 0; e->fields && i < e->n_fields; i++) {
        const redisReply *k = e->fields->element[2 * i];
        if (k->type == REDIS_REPLY_STRING && k->len == name_len &&
            memcmp(k->str, name, name_len) == 0)
            return e->fields->element[2 * i + 1];
    }
    return NULL;
}
