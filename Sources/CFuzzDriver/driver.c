// libFuzzer's entry point when it is linked without its own main
// (libclang_rt.fuzzer_no_main); weak, so an ordinary build links too.
#include "CFuzzDriver.h"

extern int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*one)(const uint8_t *, size_t)) __attribute__((weak));

int weft_fuzzer_linked(void) { return LLVMFuzzerRunDriver != 0; }

int weft_run_fuzzer(int *argc, char ***argv, weft_fuzz_one one) {
    if (!LLVMFuzzerRunDriver) return 2;
    return LLVMFuzzerRunDriver(argc, argv, one);
}
