#include "common/child_processes.h"

#include <filesystem>
#include <fstream>
#include <iterator>

#include "process/rank_processes.h"

namespace moedist {

std::vector<ChildResult> run_in_children(int n, const std::function<std::string(int)>& body) {
  // Answers travel in files, not pipes: a body that leaves a background process behind (holding a pipe's
  // write end) cannot keep the parent waiting, and no child blocks on a full pipe nobody reads yet.
  const process::TempDir dir("moedist-children");
  std::vector<std::string> answers, partial;
  for (int i = 0; i < n; ++i) {
    answers.push_back(process::result_file(dir.path(), i));
    partial.push_back(answers.back() + ".part");
  }
  process::RankProcesses children;
  for (int i = 0; i < n; ++i) {
    children.start([&, i]() -> int {
      std::string text;
      try {
        text = body(i);
      } catch (const std::exception& e) {
        text = std::string("exception: ") + e.what();
      }
      // Renamed once complete, so that a child that dies while writing has no answer.
      std::ofstream(partial[static_cast<std::size_t>(i)], std::ios::binary) << text;
      std::filesystem::rename(partial[static_cast<std::size_t>(i)], answers[static_cast<std::size_t>(i)]);
      return 0;
    });
  }
  const std::vector<RankExit> exits = children.wait();
  std::vector<ChildResult> results(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < results.size(); ++i) {
    results[i].wait_status = exits[i].wait_status;
    std::ifstream answer(answers[i], std::ios::binary);
    results[i].finished = static_cast<bool>(answer);
    if (results[i].finished)
      results[i].text.assign(std::istreambuf_iterator<char>(answer), std::istreambuf_iterator<char>());
  }
  return results;
}

}  // namespace moedist
