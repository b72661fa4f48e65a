/* debusine-virt-hello: says which architecture it was built for. */
#include <stdio.h>

int main(void)
{
#if defined(__aarch64__)
    const char *machine = "aarch64";
#elif defined(__x86_64__)
    const char *machine = "x86_64";
#elif defined(__i386__)
    const char *machine = "i386";
#else
    const char *machine = "other";
#endif
    printf("hello from %s\n", machine);
    return 0;
}
