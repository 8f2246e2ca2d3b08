/*
 * Unit tests for core's text helper (ms_utf8_copy makes script text safe for JSON) and its log
 * files (ms_log_set_file: rotation by size, whole lines, backups kept).
 */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

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

static long long file_size(const char *dir, const char *name)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    struct stat st;
    return stat(path, &st) == 0 ? (long long)st.st_size : -1;
}

static void test_log_files(void)
{
    char tmpl[] = "/tmp/ms_test_core_XXXXXX";
    ASSERT_TRUE(mkdtemp(tmpl) != NULL);
    char dir[256], err[512];
    snprintf(dir, sizeof dir, "%s/a/b", tmpl);
    ms_log_set_stderr(0); /* the lines below are for the file only */
    ASSERT_INT_EQ(ms_log_set_file(dir, "t.log", 300, 2, err, sizeof err), 0);
    for (int i = 0; i < 40; i++)
        ms_info("line %d, long enough to fill a file within a few lines", i);
    /* Rotated: t.log, t.log.1, t.log.2, never t.log.3; each within 300 bytes. */
    ASSERT_TRUE(file_size(dir, "t.log") > 0 && file_size(dir, "t.log") <= 300);
    ASSERT_TRUE(file_size(dir, "t.log.1") > 200 && file_size(dir, "t.log.1") <= 300);
    ASSERT_TRUE(file_size(dir, "t.log.2") > 200 && file_size(dir, "t.log.2") <= 300);
    ASSERT_INT_EQ(file_size(dir, "t.log.3"), -1);
    /* A line longer than the limit gets a file to itself. */
    char big[600];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    ms_info("%s", big);
    ms_info("after");
    ASSERT_TRUE(file_size(dir, "t.log.1") > 600);
    ASSERT_TRUE(file_size(dir, "t.log") < 300);
    /* No backups: the file starts again empty. */
    ASSERT_INT_EQ(ms_log_set_file(dir, "z.log", 300, 0, err, sizeof err), 0);
    for (int i = 0; i < 40; i++)
        ms_info("line %d, long enough to fill a file within a few lines", i);
    ASSERT_TRUE(file_size(dir, "z.log") > 0 && file_size(dir, "z.log") <= 300);
    ASSERT_INT_EQ(file_size(dir, "z.log.1"), -1);
    /* A folder under a regular file: an error, and the file in use stays. */
    char bad[300];
    snprintf(bad, sizeof bad, "%s/z.log/sub", dir);
    ASSERT_INT_EQ(ms_log_set_file(bad, "c.log", 0, 0, err, sizeof err), -1);
    ASSERT_CONTAINS(err, "cannot create it: Not a directory");
    long long before = file_size(dir, "z.log");
    ms_info("still here");
    ASSERT_TRUE(file_size(dir, "z.log") > before || file_size(dir, "z.log") < 40);
    /* NULL closes the file: lines go to stderr again. */
    ASSERT_INT_EQ(ms_log_set_file(NULL, "", 0, 0, err, sizeof err), 0);
    ms_log_set_stderr(1);
    before = file_size(dir, "z.log");
    ms_info("to stderr (expected in the test output)");
    ASSERT_TRUE(file_size(dir, "z.log") == before);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpl);
    ASSERT_INT_EQ(system(cmd), 0);
}

int main(void)
{
    test_valid_text_unchanged();
    test_invalid_bytes_replaced();
    test_cut_never_splits_a_character();
    test_cut_tail_dropped();
    test_in_place();
    test_log_files();
    return TEST_DONE();
}
