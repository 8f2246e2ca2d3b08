/*
 * Unit tests for core's text helper: ms_utf8_copy makes script text safe for JSON.
 */
#include <jansson.h>

#include "core/core.h"
#include "test.h"

/* Copies s (n bytes) into a buffer of cap bytes and checks the result against want. */
static void check_copy(const char *s, size_t n, size_t cap, const char *want)
{
    char out[64];
    size_t len = ms_utf8_copy(out, cap, s, n);
    ASSERT_INT_EQ(len, strlen(want));
    ASSERT_STR_EQ(out, want);
    json_t *j = json_stringn(out, len); /* NULL for anything jansson refuses */
    ASSERT_TRUE(j != NULL);
    json_decref(j);
}

static void test_valid_text_unchanged(void)
{
    check_copy("plain", 5, 64, "plain");
    check_copy("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", 14, 64,
               "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
    check_copy("tab\tand\nnewline", 15, 64, "tab\tand\nnewline"); /* JSON escapes these */
    check_copy("", 0, 64, "");
}

static void test_invalid_bytes_replaced(void)
{
    check_copy("caf\xe9 \xff broken", 13, 64, "caf? ? broken");
    check_copy("\x80\xbf", 2, 64, "??");           /* stray continuation bytes */
    check_copy("\xc0\xaf", 2, 64, "??");           /* overlong '/' */
    check_copy("\xed\xa0\x80", 3, 64, "???");      /* a UTF-16 surrogate */
    check_copy("\xf4\x90\x80\x80", 4, 64, "????"); /* beyond U+10FFFF */
    check_copy("mid \xe2\x82.", 7, 64, "mid ??."); /* a sequence cut short inside */
}

static void test_cut_never_splits_a_character(void)
{
    check_copy("ab\xc3\xa9", 4, 4, "ab"); /* room for "ab" + NUL only */
    check_copy("ab\xc3\xa9", 4, 5, "ab\xc3\xa9");
    check_copy("\xe2\x82\xac\xe2\x82\xac", 6, 6, "\xe2\x82\xac");
    char out[1];
    ASSERT_INT_EQ(ms_utf8_copy(out, 1, "x", 1), 0);
    ASSERT_STR_EQ(out, "");
    ASSERT_INT_EQ(ms_utf8_copy(out, 0, "x", 1), 0);
}

/* What snprintf leaves when its buffer ends inside a character: the partial one goes. */
static void test_cut_tail_dropped(void)
{
    check_copy("end \xe2\x82", 6, 64, "end ");
    check_copy("end \xc3", 5, 64, "end ");
    check_copy("end \xf0\x9f\x98", 7, 64, "end ");
    check_copy("end \x82", 5, 64, "end ?"); /* a lone continuation byte is no cut */
}

static void test_in_place(void)
{
    char s[] = "a\xff"
               "b\xc3\xa9";
    size_t len = ms_utf8_copy(s, sizeof s, s, strlen(s));
    ASSERT_INT_EQ(len, 5);
    ASSERT_STR_EQ(s, "a?b\xc3\xa9");
}

int main(void)
{
    test_valid_text_unchanged();
    test_invalid_bytes_replaced();
    test_cut_never_splits_a_character();
    test_cut_tail_dropped();
    test_in_place();
    return TEST_DONE();
}
