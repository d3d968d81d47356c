/* setjmp/longjmp for the return-probe tests: Rust cannot call setjmp (it returns twice). */
#include <setjmp.h>

static __thread jmp_buf *current;

/* Calls f(arg) under a setjmp; returns 0 when f returned, 1 when probekit_jump_out
   jumped back here. */
int probekit_jump_run(void (*f)(void *), void *arg) {
    jmp_buf buf;
    jmp_buf *outer = current;
    current = &buf;
    int jumped = setjmp(buf);
    if (!jumped)
        f(arg);
    current = outer;
    return jumped;
}

/* Jumps back to the innermost probekit_jump_run of this thread, past every frame between. */
void probekit_jump_out(void) {
    longjmp(*current, 1);
}
