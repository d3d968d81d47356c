/* Reads a frame the way kernel C code reads pt_regs: through generated offsets. */
#include <stdint.h>
#include "my_regs.h"

uint64_t peek_arg0(const void *frame)
{
	return *(const uint64_t *)((const char *)frame + S_ARG0);
}

uint64_t peek_arg1(const void *frame)
{
	return *(const uint64_t *)((const char *)frame + S_ARG1);
}
