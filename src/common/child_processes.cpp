#include "common/child_processes.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace moedist {

std::vector<ChildResult> run_in_children(int n, const std::function<std::string(int)>& body) {
  std::vector<pid_t> pids;
  std::vector<int> fds;
  for (int i = 0; i < n; ++i) {
    int p[2];
    if (pipe(p) != 0) throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
    const pid_t pid = fork();
    if (pid < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
    if (pid == 0) {
      close(p[0]);
      std::string text;
      try {
        text = body(i);
      } catch (const std::exception& e) {
        text = std::string("exception: ") + e.what();
      }
      const std::string message = "F" + text;  // the marker tells a finished child from one that died
      std::size_t sent = 0;
      while (sent < message.size()) {
        const ssize_t w = write(p[1], message.data() + sent, message.size() - sent);
        if (w <= 0) break;
        sent += static_cast<std::size_t>(w);
      }
      close(p[1]);
      _exit(0);
    }
    close(p[1]);
    pids.push_back(pid);
    fds.push_back(p[0]);
  }
  std::vector<ChildResult> results(static_cast<std::size_t>(n));
  for (std::size_t i = 0; i < results.size(); ++i) {
    std::string got;
    char buf[4096];
    ssize_t r;
    while ((r = read(fds[i], buf, sizeof buf)) > 0 || (r < 0 && errno == EINTR)) {
      if (r > 0) got.append(buf, static_cast<std::size_t>(r));
    }
    close(fds[i]);
    while (waitpid(pids[i], &results[i].wait_status, 0) < 0 && errno == EINTR) {
    }
    results[i].finished = !got.empty() && got[0] == 'F';
    if (results[i].finished) results[i].text = got.substr(1);
  }
  return results;
}

}  // namespace moedist
