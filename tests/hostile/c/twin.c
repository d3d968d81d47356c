/* Built twice, as libhostile_twin_a.so and libhostile_twin_b.so, from this one source
   with a different TWIN_VALUE: the two libraries have the same layout, so their
   functions sit at the same offset, and B loaded where A was unloaded puts its
   function at A's old address (issue 17, item 1). */
int hostile_twin_value(void) {
    return TWIN_VALUE;
}
