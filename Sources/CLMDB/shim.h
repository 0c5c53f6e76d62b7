#ifndef CLMDB_SHIM_H
#define CLMDB_SHIM_H
// The only place the C library enters the package: Debian's liblmdb-dev (pkg-config `lmdb`).
#include <lmdb.h>
#endif
