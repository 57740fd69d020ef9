// run_in_children: answers in child order, exceptions as text, a child that dies told apart.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <csignal>
#include <stdexcept>
#include <string>

#include "common/child_processes.h"

namespace moedist {
namespace {

TEST(ChildProcesses, AnswersComeBackInChildOrder) {
  const auto results = run_in_children(4, [](int i) { return "child " + std::to_string(i) + std::string(i == 2 ? 5000 : 0, 'x'); });
  ASSERT_EQ(results.size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(results[static_cast<std::size_t>(i)].finished);
    EXPECT_EQ(results[static_cast<std::size_t>(i)].text, "child " + std::to_string(i) + std::string(i == 2 ? 5000 : 0, 'x'));
  }
}

TEST(ChildProcesses, AnExceptionIsTextAndADeathIsNotAnAnswer) {
  const auto results = run_in_children(3, [](int i) -> std::string {
    if (i == 0) throw std::runtime_error("boom");
    if (i == 1) std::raise(SIGKILL);
    return "";
  });
  EXPECT_TRUE(results[0].finished);
  EXPECT_EQ(results[0].text, "exception: boom");
  EXPECT_FALSE(results[1].finished);
  EXPECT_TRUE(WIFSIGNALED(results[1].wait_status));
  EXPECT_TRUE(results[2].finished);
  EXPECT_EQ(results[2].text, "");
}

}  // namespace
}  // namespace moedist
