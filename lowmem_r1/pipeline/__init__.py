"""Multi-stage recipes ([[stages]]): the R1 pipeline and distillation, run by `lowmem-r1 train`."""
