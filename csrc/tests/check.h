// Minimal test harness for the C++ unit tests (built and run by tests/test_native_memory.py
// under AddressSanitizer + UBSan): CHECK records a failure, main runs every registered test.
#pragma once

#include <cstdio>
#include <functional>
#include <vector>

namespace audioenc_test {

struct Registry {
  static std::vector<std::pair<const char*, std::function<void()>>>& tests() {
    static std::vector<std::pair<const char*, std::function<void()>>> t;
    return t;
  }
  static int& failures() {
    static int n = 0;
    return n;
  }
};

struct Register {
  Register(const char* name, std::function<void()> fn) { Registry::tests().emplace_back(name, fn); }
};

}  // namespace audioenc_test

#define TEST(name)                                                              \
  static void name();                                                           \
  static audioenc_test::Register name##_registered(#name, name);                \
  static void name()

#define CHECK(cond)                                                             \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++audioenc_test::Registry::failures();                                    \
    }                                                                           \
  } while (0)
