// Runs every TEST of csrc/tests/*.cpp; exit status 1 on any failed CHECK.
#include "tests/check.h"

int main() {
  for (auto& t : audioenc_test::Registry::tests()) {
    std::fprintf(stderr, "[ RUN  ] %s\n", t.first);
    t.second();
  }
  const int n = audioenc_test::Registry::failures();
  std::fprintf(stderr, n ? "%d CHECK(s) failed\n" : "all passed\n", n);
  return n ? 1 : 0;
}
