/*
 * Fuzz harness of the config loader (engine/config): any text must give a config or a list of
 * errors, never a crash, an out-of-bounds read or a leak. Every error must be formatted
 * "fuzz.yaml:L:C: message" with L and C at least 1 (editors and the CLI jump to that place), and
 * loading the same text again must give the same outcome and the same number of errors (no
 * state kept between loads). The folder given for imports does not exist, so import_path and
 * file references fail the same way each time. Built as a libFuzzer binary with -DMS_FUZZ=ON
 * (clang), else linked with replay.c so ctest runs the corpus (tests/fuzz/corpus/config).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "config/config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* "fuzz.yaml:L:C: " with L, C decimal and >= 1, then a non-empty message. */
static int well_formed(const char *e)
{
    static const char prefix[] = "fuzz.yaml:";
    if (strncmp(e, prefix, sizeof prefix - 1) != 0)
        return 0;
    const char *p = e + sizeof prefix - 1;
    for (int field = 0; field < 2; field++) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || *p < '0' || *p > '9' || v < 1 || *end != ':')
            return 0;
        p = end + 1;
    }
    return p[0] == ' ' && p[1] != '\0';
}

static int load(const uint8_t *data, size_t size, size_t *n_errors)
{
    ms_config_t *cfg = NULL;
    ms_config_errors_t errs = {0};
    int rc =
        ms_config_load_string((const char *)data, size, "fuzz.yaml", "/nonexistent", &cfg, &errs);
    if ((rc == 0) != (cfg != NULL) || (rc == 0) != (errs.n == 0))
        abort(); /* a config exactly when there is no error */
    for (size_t i = 0; i < errs.n; i++)
        if (!well_formed(errs.items[i]))
            abort();
    *n_errors = errs.n;
    ms_config_free(cfg);
    ms_config_errors_free(&errs);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* The loader takes a length, not a C string: give it an exact-size copy so a read past the
     * end is caught even where the fuzzer's buffer would have had room. */
    uint8_t *copy = malloc(size ? size : 1);
    if (!copy)
        return 0;
    memcpy(copy, data, size);
    size_t n1, n2;
    int rc1 = load(copy, size, &n1);
    int rc2 = load(copy, size, &n2);
    if (rc1 != rc2 || n1 != n2)
        abort(); /* loading is deterministic */
    free(copy);
    return 0;
}
