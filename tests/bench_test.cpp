// `moedist bench`'s library (bench/): a quick sweep over the in-process transport and the memcpy floor, its JSON
// and CSV outputs, and the byte counts, percentiles and skips the tables rest on; and the MPI transports (the
// baseline and moedist over MPI across virtual hosts) when mpirun is there.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "runners.h"
#include "sweep.h"
#include "workload.h"

namespace moedist::bench {
namespace {

SweepOptions quick_options() {
  SweepOptions o;
  o.transports = {"inproc", "memcpy-floor"};
  o.world_sizes = {2};
  o.bs = {1, 16};
  o.hidden = {256};
  o.topk = {2};
  o.quant_modes = {0, 2};
  o.run.loop.warmup = 1;
  o.run.loop.max_iters = 3;
  o.run.loop.min_iters = 3;
  return o;
}

// Why the MPI transports cannot run here, or "".
std::string mpi_missing() {
  if (find_in_path("mpirun").empty()) return "mpirun is not in PATH";
#ifndef MOEDIST_HAVE_MPI
  return "moedist was built without MPI";
#endif
  return "";
}

std::string temp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("moedist_bench_test_" + std::to_string(::getpid()) + "_" + name))
      .string();
}

// Bytes of an operation computed here, from the routing alone: a set of destination ranks per token.
OpBytes expected_bytes(const Point& p, const std::string& op) {
  const std::int64_t drow = p.quant_mode == 2 ? p.h * 1 + 4 : p.h * 2;
  const std::int64_t crow = p.h * 2;
  std::int64_t entries = 0, pairs = 0;
  for (int r = 0; r < p.W; ++r) {
    const std::vector<std::int32_t> ids = make_expert_ids(p, r);
    for (std::int64_t b = 0; b < p.bs; ++b) {
      std::set<int> ranks;
      for (int k = 0; k < p.k; ++k) ranks.insert(ids[static_cast<std::size_t>(b * p.k + k)] / (p.E / p.W));
      entries += p.k;
      pairs += static_cast<std::int64_t>(ranks.size());
    }
  }
  if (op == "dispatch") return {entries * drow, pairs * drow};
  if (op == "combine") return {entries * crow, pairs * crow};
  return {entries * (drow + crow), pairs * (drow + crow)};
}

TEST(BenchRouting, CountsEntriesAndDestinationRanksOfAFixedRouting) {
  // W = 2, L = 2 (experts 0, 1 on rank 0; 2, 3 on rank 1), K = 2, three tokens.
  const std::int32_t ids[] = {0, 1, /**/ 1, 2, /**/ 3, 2};
  const RouteCounts c = count_routes(ids, 3, 2, 2, 2);
  EXPECT_EQ(c.entries, 6);
  EXPECT_EQ(c.rank_pairs, 4);  // token 0: rank 0; token 1: ranks 0 and 1; token 2: rank 1
  EXPECT_EQ(c.rows_to, (std::vector<std::int64_t>{3, 3}));
}

TEST(BenchRouting, PointBytesFollowTheDefinitions) {
  const Point p{.W = 4, .bs = 5, .h = 100, .k = 8, .E = 16, .quant_mode = 2};
  const PointBytes b = count_bytes(p);
  // Logical: every (token, expert) of every rank, (H + 4) bytes with quant 2, 2H for combine.
  EXPECT_EQ(b.dispatch.logical, 4 * 5 * 8 * (100 + 4));
  EXPECT_EQ(b.combine.logical, 4 * 5 * 8 * 200);
  for (const char* op : {"dispatch", "combine", "roundtrip"}) {
    const OpBytes want = expected_bytes(p, op);
    const OpBytes got = std::string(op) == "dispatch"  ? b.dispatch
                        : std::string(op) == "combine" ? b.combine
                                                       : b.roundtrip;
    EXPECT_EQ(got.logical, want.logical) << op;
    EXPECT_EQ(got.wire, want.wire) << op;
    EXPECT_LE(got.wire, got.logical) << op;
  }
  std::int64_t received = 0;
  for (std::int64_t r : b.received_rows) received += r;
  EXPECT_EQ(received, 4 * 5 * 8);
}

TEST(BenchRouting, RoutingIsUniformTopKDistinctAndDeterministic) {
  const Point p{.W = 4, .bs = 2000, .h = 8, .k = 8, .E = 16};
  const std::vector<std::int32_t> ids = make_expert_ids(p, 3);
  EXPECT_EQ(ids, make_expert_ids(p, 3));
  EXPECT_NE(ids, make_expert_ids(p, 2));
  std::vector<int> hits(16, 0);
  for (std::int64_t b = 0; b < p.bs; ++b) {
    const std::set<int> distinct(ids.begin() + b * p.k, ids.begin() + (b + 1) * p.k);
    ASSERT_EQ(distinct.size(), 8u);
    for (int e : distinct) {
      ASSERT_GE(e, 0);
      ASSERT_LT(e, 16);
      ++hits[static_cast<std::size_t>(e)];
    }
  }
  // 16000 picks over 16 experts: 1000 each expected; a uniform draw stays well inside +-15%.
  for (int h : hits) EXPECT_NEAR(h, 1000, 150);
}

TEST(BenchStats, NearestRankPercentilesAndTheSlowestRank) {
  std::vector<double> samples;
  for (int i = 100; i >= 1; --i) samples.push_back(i);
  const Stats s = summarize(samples);
  EXPECT_EQ(s.iters, 100);
  EXPECT_EQ(s.p50_us, 50);
  EXPECT_EQ(s.p99_us, 99);
  EXPECT_EQ(s.min_us, 1);
  EXPECT_EQ(s.max_us, 100);
  EXPECT_DOUBLE_EQ(s.mean_us, 50.5);
  EXPECT_EQ(summarize({3, 1, 2}).p99_us, 3);  // fewer than 100: the maximum

  const std::vector<std::vector<RoundTimes>> per_rank = {{{1, 5, 6}, {4, 1, 5}}, {{2, 2, 3}, {3, 3, 7}}};
  const OpSamples m = slowest_rank(per_rank);
  EXPECT_EQ(m.dispatch_us, (std::vector<double>{2, 4}));
  EXPECT_EQ(m.combine_us, (std::vector<double>{5, 3}));
  EXPECT_EQ(m.roundtrip_us, (std::vector<double>{6, 7}));
}

TEST(BenchSweep, QuickSweepWritesEveryOpToJsonAndCsv) {
  const SweepOptions o = quick_options();
  std::ostringstream text, progress;
  const SweepResult result = run_sweep(o, text, progress, false);
  EXPECT_EQ(result.failures, 0) << text.str();
  EXPECT_TRUE(result.skipped.empty()) << text.str();
  EXPECT_NE(progress.str().find("[8/8] memcpy-floor W=2 BS=16 H=256 K=2 E=8 quant=2 bf16"), std::string::npos)
      << progress.str();

  const std::string json_path = temp_path("out.json"), csv_path = temp_path("out.csv");
  const RunInfo info = collect_run_info("moedist bench --quick", o);
  write_json(json_path, info, o, result);
  write_csv(csv_path, result);

  std::ifstream jf(json_path);
  const nlohmann::json j = nlohmann::json::parse(jf);
  EXPECT_EQ(j["info"]["command"], "moedist bench --quick");
  EXPECT_FALSE(j["info"]["cpu_model"].get<std::string>().empty());
  EXPECT_FALSE(j["info"]["kernels_isa"].get<std::string>().empty());
  // The machine's noise probe: 2000 timed pieces of about 10 us, ordered statistics.
  const nlohmann::json& noise = j["info"]["noise"];
  EXPECT_EQ(noise["iters"], 2000);
  EXPECT_GT(noise["p50_us"].get<double>(), 1.0);
  EXPECT_LE(noise["p50_us"].get<double>(), noise["p99_us"].get<double>());
  EXPECT_LE(noise["p99_us"].get<double>(), noise["max_us"].get<double>());
  EXPECT_LE(noise["mean_us"].get<double>(), noise["max_us"].get<double>());
  std::set<std::tuple<std::string, std::int64_t, int, std::string>> seen;  // transport, BS, quant, op
  for (const nlohmann::json& r : j["results"]) {
    const Point p{.W = r["W"].get<int>(),
                  .bs = r["BS"].get<std::int64_t>(),
                  .h = r["H"].get<std::int64_t>(),
                  .k = r["K"].get<int>(),
                  .E = r["E"].get<int>(),
                  .quant_mode = r["quant_mode"].get<int>()};
    const std::string op = r["op"];
    const OpBytes want = expected_bytes(p, op);
    EXPECT_EQ(r["logical_bytes"].get<std::int64_t>(), want.logical) << r.dump();
    EXPECT_EQ(r["wire_bytes"].get<std::int64_t>(), want.wire) << r.dump();
    EXPECT_EQ(r["iters"].get<int>(), 3);
    EXPECT_GT(r["p50_us"].get<double>(), 0);
    EXPECT_GE(r["p99_us"].get<double>(), r["p50_us"].get<double>());
    EXPECT_NEAR(r["logical_gbps"].get<double>(), static_cast<double>(want.logical) / r["p50_us"].get<double>() * 1e-3,
                1e-9);
    EXPECT_FALSE(r["x_floor"].is_null());  // the floor ran at every point
    EXPECT_TRUE(r["x_mpi"].is_null());     // mpi was not asked for
    seen.insert({r["transport"], p.bs, p.quant_mode, op});
  }
  for (const std::string t : {"inproc", "memcpy-floor"}) {
    for (std::int64_t bs : {1, 16}) {
      for (int q : {0, 2}) {
        for (const std::string op : {"dispatch", "combine", "roundtrip"})
          EXPECT_TRUE(seen.count({t, bs, q, op})) << t << " BS=" << bs << " quant=" << q << " " << op;
      }
    }
  }
  EXPECT_EQ(j["results"].size(), 24u);

  std::ifstream cf(csv_path);
  std::string header, line;
  std::getline(cf, header);
  EXPECT_EQ(header.rfind("transport,W,BS,H,K,E,quant_mode,dtype,op,iters,p50_us,p99_us", 0), 0u);
  int lines = 0;
  while (std::getline(cf, line)) {
    ++lines;
    EXPECT_EQ(std::count(line.begin(), line.end(), ','), std::count(header.begin(), header.end(), ',')) << line;
  }
  EXPECT_EQ(lines, 24);
  std::remove(json_path.c_str());
  std::remove(csv_path.c_str());

  // The text: one table per point, with both transports and every op.
  EXPECT_NE(text.str().find("== W=2 BS=16 H=256 K=2 E=8 quant=2 bf16"), std::string::npos);
  EXPECT_NE(text.str().find("memcpy-floor  roundtrip"), std::string::npos) << text.str();
}

TEST(BenchSweep, HeaderStatesTheDefinitionsAndTheMachine) {
  std::ostringstream out;
  print_header(out, collect_run_info("moedist bench --bs 1", quick_options()), quick_options());
  const std::string s = out.str();
  for (const char* needle : {"command   : moedist bench --bs 1", "machine   : ", "kernels   : ", "date      : ",
                             "logical GB/s  sum over ranks of one row per (token, expert)", "wire GB/s     the same",
                             "count exchange", "mpi       : not asked for", "noise     : a fixed piece of work"}) {
    EXPECT_NE(s.find(needle), std::string::npos) << needle << "\n" << s;
  }
}

TEST(BenchSweep, RunsTooLargeForMemoryAreSkippedWithAReason) {
  SweepOptions o = quick_options();
  o.bs = {16};
  o.quant_modes = {0};
  o.memory_fraction = 1e-12;  // nothing fits
  std::ostringstream text, progress;
  const SweepResult result = run_sweep(o, text, progress, false);
  EXPECT_TRUE(result.rows.empty());
  EXPECT_EQ(result.failures, 0);
  ASSERT_EQ(result.skipped.size(), 2u);
  for (const SkipRow& s : result.skipped) {
    EXPECT_FALSE(s.failed);
    EXPECT_NE(s.reason.find("needs about"), std::string::npos) << s.reason;
  }
  EXPECT_NE(text.str().find("skipped inproc: needs about"), std::string::npos) << text.str();
  EXPECT_NE(text.str().find("moedist::capacity()"), std::string::npos) << text.str();
}

// mpi and moedist-mpi at W = 4 in 2 virtual hosts of 2 ranks: both run, moedist-mpi gets its ratio to the baseline,
// and its bytes between hosts show tokens crossing each remote host once.
TEST(BenchSweep, MoedistOverMpiReportsTheBytesBetweenHosts) {
  if (const std::string why = mpi_missing(); !why.empty()) GTEST_SKIP() << why;
  SweepOptions o = quick_options();
  o.transports = {"mpi", "moedist-mpi"};
  o.world_sizes = {4};
  o.hosts = 2;
  o.topk = {4};
  o.bs = {16};
  o.quant_modes = {0, 2};
  std::ostringstream text, progress;
  const SweepResult result = run_sweep(o, text, progress, false);
  ASSERT_EQ(result.failures, 0) << text.str();
  ASSERT_TRUE(result.skipped.empty()) << text.str();
  ASSERT_TRUE(result.mpi_unavailable.empty()) << result.mpi_unavailable;
  ASSERT_EQ(result.rows.size(), 12u) << text.str();  // 2 transports x 2 quant modes x 3 ops

  std::set<std::tuple<std::string, int, std::string>> seen;  // transport, quant, op
  for (const ResultRow& r : result.rows) {
    seen.insert({r.transport, r.point.quant_mode, r.op});
    EXPECT_EQ(r.point.E, 16);
    EXPECT_EQ(r.stats.iters, 3);
    EXPECT_GT(r.stats.p50_us, 0);
    EXPECT_FALSE(std::isnan(r.x_mpi)) << r.transport << " " << r.op;  // the baseline ran at every point
    if (r.transport == "mpi") {
      EXPECT_EQ(r.between_hosts.hosts, 0);  // not measured
      continue;
    }
    const BetweenHosts& b = r.between_hosts;
    EXPECT_EQ(b.hosts, 2);
    EXPECT_EQ(b.ranks_per_host, 2);
    EXPECT_GT(b.dispatch, 0);
    EXPECT_GT(b.dispatch_flat, 0);
    EXPECT_GT(b.combine, 0);
    EXPECT_GT(b.combine_flat, 0);
    // K = 4 of 16 experts over 2 hosts: most tokens have several experts on the remote host; without smooth scales
    // (quant 0) a token's row crosses once per host, against once per expert in a flat all-to-all.
    if (r.point.quant_mode == 0) {
      EXPECT_LT(b.dispatch, b.dispatch_flat);
    }
  }
  for (const std::string t : {"mpi", "moedist-mpi"}) {
    for (int q : {0, 2}) {
      for (const std::string op : {"dispatch", "combine", "roundtrip"})
        EXPECT_TRUE(seen.count({t, q, op})) << t << " quant=" << q << " " << op;
    }
  }
  EXPECT_NE(text.str().find("between hosts 2 hosts of 2 ranks: dispatch "), std::string::npos) << text.str();
  EXPECT_NE(text.str().find("flat all-to-all"), std::string::npos) << text.str();

  const std::string json_path = temp_path("mpi.json"), csv_path = temp_path("mpi.csv");
  const RunInfo info = collect_run_info("moedist bench --transport mpi,moedist-mpi", o);
  EXPECT_EQ(info.mpi.rfind("unavailable", 0), std::string::npos) << info.mpi;
  write_json(json_path, info, o, result);
  write_csv(csv_path, result);
  std::ifstream jf(json_path);
  const nlohmann::json j = nlohmann::json::parse(jf);
  EXPECT_EQ(j["settings"]["hosts"], 2);
  int measured = 0;
  for (const nlohmann::json& r : j["results"]) {
    if (r["transport"] != "moedist-mpi") {
      EXPECT_FALSE(r.contains("between_hosts")) << r.dump();
      continue;
    }
    ++measured;
    ASSERT_TRUE(r.contains("between_hosts")) << r.dump();
    const nlohmann::json& b = r["between_hosts"];
    for (const char* field : {"hosts", "ranks_per_host", "dispatch", "dispatch_flat", "combine", "combine_flat"})
      EXPECT_TRUE(b.contains(field)) << field << " " << r.dump();
    EXPECT_EQ(b["hosts"], 2);
    EXPECT_GT(b["combine_flat"].get<std::int64_t>(), 0);
    EXPECT_FALSE(r["x_mpi"].is_null()) << r.dump();
  }
  EXPECT_EQ(measured, 6);

  std::ifstream cf(csv_path);
  std::string header, line;
  std::getline(cf, header);
  EXPECT_NE(header.find(",hosts,ranks_per_host,dispatch_bytes_between_hosts,dispatch_bytes_between_hosts_flat,"
                        "combine_bytes_between_hosts,combine_bytes_between_hosts_flat"),
            std::string::npos)
      << header;
  int lines = 0;
  while (std::getline(cf, line)) {
    ++lines;
    EXPECT_EQ(std::count(line.begin(), line.end(), ','), std::count(header.begin(), header.end(), ',')) << line;
    if (line.rfind("moedist-mpi,", 0) == 0) {
      EXPECT_NE(line.find(",2,2,"), std::string::npos) << line;
    }
  }
  EXPECT_EQ(lines, 12);
  std::remove(json_path.c_str());
  std::remove(csv_path.c_str());
}

// --no-scales reaches both MPI transports: the baseline quantizes each token once, moedist-mpi passes no scales.
TEST(BenchSweep, NoScalesOverBothMpiTransports) {
  if (const std::string why = mpi_missing(); !why.empty()) GTEST_SKIP() << why;
  SweepOptions o = quick_options();
  o.transports = {"mpi", "moedist-mpi"};
  o.bs = {8};
  o.quant_modes = {2};
  o.no_scales = true;
  std::ostringstream text, progress;
  const SweepResult result = run_sweep(o, text, progress, false);
  ASSERT_EQ(result.failures, 0) << text.str();
  ASSERT_EQ(result.rows.size(), 6u) << text.str();
  for (const ResultRow& r : result.rows) EXPECT_FALSE(r.point.smooth) << r.transport;
  EXPECT_NE(text.str().find("quant=2 no-scales"), std::string::npos) << text.str();
}

TEST(BenchSweep, UnusablePointsAndOptionsAreRejectedClearly) {
  SweepOptions o = quick_options();
  o.topk = {9};  // E = 2 * 4 = 8 < K
  std::ostringstream text, progress;
  const SweepResult result = run_sweep(o, text, progress, false);
  EXPECT_TRUE(result.rows.empty());
  EXPECT_NE(text.str().find("skipped point: K = 9 is not in [1, E = 8]"), std::string::npos) << text.str();

  o = quick_options();
  o.transports = {"inproc", "nccl"};
  EXPECT_THROW(validate(o), std::invalid_argument);
  o = quick_options();
  o.run.loop.warmup = 0;
  EXPECT_THROW(validate(o), std::invalid_argument);
  o = quick_options();
  o.hosts = 0;
  EXPECT_THROW(validate(o), std::invalid_argument);
}

// A quick sweep with `o`, its JSON (written and read back) and its text.
struct QuickRun {
  SweepResult result;
  nlohmann::json json;
  std::string text, csv_header;
  std::vector<std::string> csv_lines;
};

QuickRun quick_run(const SweepOptions& o) {
  QuickRun run;
  std::ostringstream text, progress;
  print_header(text, collect_run_info("moedist bench --quick", o), o);
  run.result = run_sweep(o, text, progress, false);
  run.text = text.str();
  const std::string json_path = temp_path("quick.json"), csv_path = temp_path("quick.csv");
  write_json(json_path, collect_run_info("moedist bench --quick", o), o, run.result);
  write_csv(csv_path, run.result);
  std::ifstream jf(json_path);
  run.json = nlohmann::json::parse(jf);
  std::ifstream cf(csv_path);
  std::getline(cf, run.csv_header);
  for (std::string line; std::getline(cf, line);) run.csv_lines.push_back(line);
  std::remove(json_path.c_str());
  std::remove(csv_path.c_str());
  return run;
}

// The CSV field of `column` in `line`.
std::string csv_field(const std::string& header, const std::string& line, const std::string& column) {
  std::vector<std::string> names, values;
  std::stringstream h(header), l(line);
  for (std::string f; std::getline(h, f, ',');) names.push_back(f);
  for (std::string f; std::getline(l, f, ',');) values.push_back(f);
  if (!line.empty() && line.back() == ',') values.emplace_back();
  for (std::size_t i = 0; i < names.size() && i < values.size(); ++i) {
    if (names[i] == column) return values[i];
  }
  return "<no column " + column + ">";
}

std::int64_t logical_bytes(const nlohmann::json& results, const nlohmann::json& like) {
  for (const nlohmann::json& r : results) {
    if (r["transport"] == like["transport"] && r["BS"] == like["BS"] && r["quant_mode"] == like["quant_mode"] &&
        r["op"] == like["op"])
      return r["logical_bytes"].get<std::int64_t>();
  }
  return -1;
}

TEST(BenchSweep, TablesShowTheMeanBesideThePercentiles) {
  SweepOptions o = quick_options();
  o.transports = {"inproc"};
  o.quant_modes = {0};
  o.bs = {4};
  const QuickRun run = quick_run(o);
  ASSERT_EQ(run.result.failures, 0) << run.text;
  EXPECT_NE(run.text.find("p50 us     p99 us    mean us"), std::string::npos) << run.text;
  EXPECT_NE(run.text.find("mean is their arithmetic mean"), std::string::npos) << run.text;
  for (const nlohmann::json& r : run.json["results"]) EXPECT_GT(r["mean_us"].get<double>(), 0) << r.dump();
}

TEST(BenchSweep, NoScalesQuantizesWithoutSmoothScalesForEveryTransport) {
  SweepOptions o = quick_options();
  o.quant_modes = {2};
  o.no_scales = true;
  const QuickRun run = quick_run(o);
  ASSERT_EQ(run.result.failures, 0) << run.text;  // moedist's traffic self-check included
  EXPECT_EQ(run.json["settings"]["no_scales"], true);
  EXPECT_NE(run.text.find("quant 2 without smooth scales (--no-scales)"), std::string::npos) << run.text;
  EXPECT_NE(run.text.find("== W=2 BS=16 H=256 K=2 E=8 quant=2 no-scales bf16"), std::string::npos) << run.text;
  ASSERT_EQ(run.json["results"].size(), 12u);
  for (const nlohmann::json& r : run.json["results"]) EXPECT_EQ(r["smooth_scales"], false) << r.dump();
  for (const std::string& line : run.csv_lines)
    EXPECT_EQ(csv_field(run.csv_header, line, "smooth_scales"), "0") << line;
  // The rows are as large as with scales (H int8 + the fp32 scale): only the quantization work differs.
  SweepOptions with = o;
  with.no_scales = false;
  const QuickRun scaled = quick_run(with);
  EXPECT_EQ(scaled.json["results"][0]["smooth_scales"], true);
  for (const nlohmann::json& r : run.json["results"])
    EXPECT_EQ(r["logical_bytes"], logical_bytes(scaled.json["results"], r));
}

TEST(BenchSweep, SharedExpertRanksAddOneRowPerToken) {
  SweepOptions o = quick_options();
  o.shared_expert_rank_num = 1;  // W = 2: rank 0 the shared expert, rank 1 the E = (2 - 1) * 4 MoE experts
  o.transports = {"inproc", "memcpy-floor"};
  const QuickRun run = quick_run(o);
  ASSERT_EQ(run.result.failures, 0) << run.text;  // moedist's traffic self-check: the bytes below are what it moved
  ASSERT_EQ(run.json["results"].size(), 24u) << run.text;
  EXPECT_EQ(run.json["settings"]["shared_expert_rank_num"], 1);
  EXPECT_NE(run.text.find("== W=2 BS=16 H=256 K=2 E=4 S=1 quant=0 bf16"), std::string::npos) << run.text;
  for (const nlohmann::json& r : run.json["results"]) {
    EXPECT_EQ(r["S"], 1);
    EXPECT_EQ(r["E"], 4);
    const std::int64_t bs = r["BS"], drow = r["quant_mode"] == 2 ? 256 + 4 : 512;
    if (r["op"] == "dispatch") {
      EXPECT_EQ(r["logical_bytes"].get<std::int64_t>(), 2 * bs * (2 + 1) * drow) << r.dump();
    }
  }
  for (const std::string& line : run.csv_lines) EXPECT_EQ(csv_field(run.csv_header, line, "S"), "1") << line;
}

TEST(BenchSweep, TpPairsDoubleTheRanks) {
  SweepOptions o = quick_options();
  o.tp_world_size = 2;
  o.local_experts = 1;  // a TP pair needs one expert per MoE rank
  o.topk = {1};
  o.transports = {"inproc", "memcpy-floor"};
  const QuickRun run = quick_run(o);
  ASSERT_EQ(run.result.failures, 0) << run.text;
  ASSERT_EQ(run.json["results"].size(), 24u) << run.text;
  EXPECT_EQ(run.json["settings"]["tp_world_size"], 2);
  EXPECT_NE(run.text.find("T = 2 (a TP pair per EP rank: W x 2 ranks)"), std::string::npos) << run.text;
  EXPECT_NE(run.text.find("== W=2 BS=16 H=256 K=1 E=2 T=2 quant=2 bf16"), std::string::npos) << run.text;
  SweepOptions no_tp = o;
  no_tp.tp_world_size = 0;
  const QuickRun single = quick_run(no_tp);
  for (const nlohmann::json& r : run.json["results"]) {
    EXPECT_EQ(r["T"], 2);
    EXPECT_EQ(r["W"], 2);
    EXPECT_EQ(r["ranks"], 4);
    EXPECT_EQ(r["logical_bytes"].get<std::int64_t>(), 2 * logical_bytes(single.json["results"], r)) << r.dump();
  }
  for (const std::string& line : run.csv_lines) EXPECT_EQ(csv_field(run.csv_header, line, "ranks"), "4") << line;
}

TEST(BenchSweep, BackgroundLoadRunsBesideTheTimedRunsAndStops) {
  {
    BackgroundLoad load(2);
    EXPECT_EQ(load.threads(), 2);
    load.stop();
    EXPECT_EQ(load.threads(), 0);
  }
  SweepOptions o = quick_options();
  o.transports = {"inproc"};
  o.quant_modes = {0};
  o.background_load = 1;
  const QuickRun run = quick_run(o);
  ASSERT_EQ(run.result.failures, 0) << run.text;
  EXPECT_EQ(run.result.background_load, 1);
  EXPECT_EQ(run.json["settings"]["background_load"], 1);
  EXPECT_NE(run.text.find("load      : 1 busy threads beside every timed run"), std::string::npos) << run.text;
  for (const std::string& line : run.csv_lines)
    EXPECT_EQ(csv_field(run.csv_header, line, "background_load"), "1") << line;
  // A sweep that throws still stops its load (the destructor joins the threads; a leak would hang the test).
  o.run.loop.warmup = 0;
  std::ostringstream text, progress;
  EXPECT_THROW(run_sweep(o, text, progress, false), std::invalid_argument);
}

TEST(BenchSweep, NamedGridsSetTheirListsAndCombineWithTheRest) {
  SweepOptions o = quick_options();
  apply_grid("decode", o);
  EXPECT_EQ(o.bs, (std::vector<std::int64_t>{1, 2, 4, 8, 16, 32, 64, 128}));
  EXPECT_EQ(o.world_sizes, (std::vector<int>{2}));  // untouched
  EXPECT_EQ(o.hidden, (std::vector<std::int64_t>{256}));
  o.transports = {"inproc"};
  o.quant_modes = {0};
  const QuickRun run = quick_run(o);
  ASSERT_EQ(run.result.failures, 0) << run.text;
  EXPECT_EQ(run.json["settings"]["grid"], "decode");
  std::set<std::int64_t> bs;
  for (const nlohmann::json& r : run.json["results"]) bs.insert(r["BS"].get<std::int64_t>());
  EXPECT_EQ(bs, (std::set<std::int64_t>{1, 2, 4, 8, 16, 32, 64, 128}));
  EXPECT_NE(run.text.find("grid decode (BS 1,2,4,8,16,32,64,128)"), std::string::npos) << run.text;

  SweepOptions prefill = quick_options();
  apply_grid("prefill", prefill);
  EXPECT_EQ(prefill.bs, (std::vector<std::int64_t>{4096}));
  EXPECT_EQ(prefill.world_sizes, (std::vector<int>{2}));
  EXPECT_EQ(grid_description("prefill"), "BS 4096, W 2");
  try {
    apply_grid("warmup", prefill);
    ADD_FAILURE() << "an unknown grid was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_STREQ(e.what(), "--grid: unknown grid 'warmup' (known: decode, prefill)");
  }
}

TEST(BenchSweep, BadValuesOfTheNewOptionsAreRefusedWithTheRule) {
  const auto refused = [](const SweepOptions& o, const std::string& want) {
    try {
      validate(o);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what()).find(want) != std::string::npos ? std::string() : std::string(e.what());
    }
    return std::string("accepted");
  };
  SweepOptions o = quick_options();
  o.shared_expert_rank_num = -1;
  EXPECT_EQ(refused(o, "--shared-expert-rank-num: -1 is negative"), "");
  o.shared_expert_rank_num = 2;  // W = 2: no MoE rank left
  EXPECT_EQ(refused(o, "--shared-expert-rank-num: 2 does not fit --ep-world-size 2 (every W must be larger than S"),
            "");
  o.world_sizes = {4, 6};  // 6 is not a multiple of 4... of S = 2 it is; S = 4 fits neither
  o.shared_expert_rank_num = 4;
  EXPECT_EQ(refused(o, "--shared-expert-rank-num: 4 does not fit --ep-world-size 4"), "");
  o = quick_options();
  o.tp_world_size = 3;
  EXPECT_EQ(refused(o, "--tp-world-size: 3 is not 0, 1 (no TP domain) or 2"), "");
  o.tp_world_size = 2;  // --local-experts 4
  EXPECT_EQ(refused(o, "--tp-world-size: 2 needs one expert per MoE rank, but --local-experts is 4"), "");
  o = quick_options();
  o.quant_modes = {0};
  o.no_scales = true;
  EXPECT_EQ(refused(o, "--no-scales: smooth scales exist only with quant_mode 2, and --quant-mode has no 2"), "");
  o = quick_options();
  o.background_load = -1;
  EXPECT_EQ(refused(o, "--background-load: -1 is not in [0, 1024]"), "");
  o.background_load = 5000;
  EXPECT_EQ(refused(o, "--background-load: 5000 is not in [0, 1024]"), "");
  o = quick_options();
  o.grid = "huge";
  EXPECT_EQ(refused(o, "--grid: unknown grid 'huge' (known: decode, prefill)"), "");
  // The MPI baseline cannot time shared experts or TP: it says so rather than time another workload.
  o = quick_options();
  o.transports = {"inproc", "mpi"};
  o.shared_expert_rank_num = 1;
  EXPECT_EQ(refused(o, "--shared-expert-rank-num: 1: the mpi baseline (MPI_Alltoallv) has no shared-expert ranks"), "");
  o.shared_expert_rank_num = 0;
  o.tp_world_size = 2;
  o.local_experts = 1;
  EXPECT_EQ(refused(o, "--tp-world-size: 2: the mpi baseline (MPI_Alltoallv) has no TP domain"), "");
  o.transports = {"inproc", "moedist-mpi"};  // moedist over MPI has both
  EXPECT_EQ(refused(o, "--"), "accepted");
}

// run_shm's report when rank processes fail (sh stands in for the rank program; the work directory is its $0):
// a rank that died is named, else the rank whose own error caused the others'.
TEST(BenchShm, AFailingRankIsNamed) {
  Point p;
  p.W = 3;
  RunSettings settings;
  const std::vector<std::string> dies = {"/bin/sh", "-c", "[ $MOEDIST_RANK != 1 ] || kill -9 $$"};
  RunOutcome o = run_shm(p, settings, dies);
  EXPECT_FALSE(o.ok);
  EXPECT_NE(o.error.find("rank 1 (pid "), std::string::npos) << o.error;
  EXPECT_NE(o.error.find("killed by signal 9"), std::string::npos) << o.error;

  // Ranks 0 and 2 report a lost peer (12: peer_lost), rank 1 its own error (3: invalid_shape).
  const std::vector<std::string> errs = {"/bin/sh", "-c",
                                         "if [ $MOEDIST_RANK = 1 ]; then printf '3\\nbad shape' > \"$0/rank1.error\"; "
                                         "else printf '12\\nlost rank 1' > \"$0/rank$MOEDIST_RANK.error\"; fi; exit 2"};
  o = run_shm(p, settings, errs);
  EXPECT_FALSE(o.ok);
  EXPECT_EQ(o.error, "rank 1: bad shape");
}

// The floor's pieces: every byte once; one piece per rank up to one thread each, a rank cut into equal
// pieces when threads outnumber ranks, ranks back to back when ranks outnumber threads.
TEST(BenchSweep, MemcpyFloorPiecesCoverEveryRankOnce) {
  using Pieces = std::vector<std::vector<std::size_t>>;
  EXPECT_EQ(memcpy_floor_pieces({100}, 1), (Pieces{{100}}));
  EXPECT_EQ(memcpy_floor_pieces({101}, 2), (Pieces{{50}, {51}}));
  EXPECT_EQ(memcpy_floor_pieces({10, 20}, 2), (Pieces{{10}, {20}}));
  EXPECT_EQ(memcpy_floor_pieces({10, 20, 30}, 2), (Pieces{{10, 30}, {20}}));
  EXPECT_EQ(memcpy_floor_pieces({9, 21}, 4), (Pieces{{4}, {5}, {10}, {11}}));
  EXPECT_EQ(memcpy_floor_pieces({9, 21}, 3), (Pieces{{9}, {21}, {}}));  // 3 / 2 ranks: one piece each
}

// --threads-per-rank reaches moedist's groups (the inproc transport's rank threads run with it) and the
// memcpy floor (a rank's bytes in pieces, W 1 and 2), and is reported in the header, the JSON and the CSV;
// the MPI baseline's rows leave it out.
TEST(BenchSweep, ThreadsPerRankIsRunAndReported) {
  SweepOptions o = quick_options();
  o.world_sizes = {1, 2};
  o.bs = {16};
  o.quant_modes = {2};
  o.run.threads_per_rank = 2;
  std::ostringstream text, progress;
  const SweepResult result = run_sweep(o, text, progress, false);
  EXPECT_EQ(result.failures, 0) << text.str();
  EXPECT_EQ(result.rows.size(), 2u * 2u * 3u);  // W 1 and 2, two transports, three operations
  for (const ResultRow& r : result.rows) EXPECT_EQ(r.threads_per_rank, 2) << r.transport;

  std::ostringstream header;
  const RunInfo info = collect_run_info("moedist bench --threads-per-rank 2", o);
  print_header(header, info, o);
  EXPECT_NE(header.str().find("threads   : 2 per moedist rank"), std::string::npos) << header.str();

  const std::string json_path = temp_path("threads.json"), csv_path = temp_path("threads.csv");
  write_json(json_path, info, o, result);
  write_csv(csv_path, result);
  std::ifstream jf(json_path);
  const nlohmann::json j = nlohmann::json::parse(jf);
  EXPECT_EQ(j["settings"]["threads_per_rank"], 2);
  for (const nlohmann::json& r : j["results"]) EXPECT_EQ(r["threads_per_rank"], 2) << r.dump();
  std::ifstream cf(csv_path);
  std::string head, line;
  std::getline(cf, head);
  EXPECT_TRUE(head.ends_with(",threads_per_rank")) << head;
  while (std::getline(cf, line)) EXPECT_TRUE(line.ends_with(",2")) << line;
  std::remove(json_path.c_str());
  std::remove(csv_path.c_str());

  o.run.threads_per_rank = 0;
  EXPECT_THROW(validate(o), std::invalid_argument);
}

}  // namespace
}  // namespace moedist::bench
