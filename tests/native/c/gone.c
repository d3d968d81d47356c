/* A shared library the tests load, probe, and unload (a probe in it is then [GONE]). */
int probekit_gone_add(int a, int b) {
    return a + b;
}
