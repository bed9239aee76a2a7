#ifndef WEFT_CFUZZDRIVER_H
#define WEFT_CFUZZDRIVER_H
#include <stddef.h>
#include <stdint.h>

typedef int (*weft_fuzz_one)(const uint8_t *data, size_t size);

/// 1 if libFuzzer (libclang_rt.fuzzer_no_main) is linked into this binary
/// (`make fuzz`), 0 in an ordinary build.
int weft_fuzzer_linked(void);

/// Runs libFuzzer's driver over `one` with the process's arguments.
int weft_run_fuzzer(int *argc, char ***argv, weft_fuzz_one one);
#endif
