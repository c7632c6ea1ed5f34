#include "common/build_info.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tunecomp {

bool openmp_enabled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace tunecomp
