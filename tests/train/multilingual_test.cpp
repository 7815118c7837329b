// The labelled (multilingual) corpus, the specialisation measure and the experts sweep: the
// extractor reproduces the committed two-language fixture, every held-out byte is scored once,
// per-document losses add up to the plain loss, NMI is 1 for perfect specialisation and 0 for
// independence, and the sweep's configs keep active FLOPs equal (computed from the configs).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <string>

#include "switchyard/core/rng.h"
#include "switchyard/train/routes.h"
#include "switchyard/train/sweep.h"
#include "switchyard/train/trainer.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

const std::string kFixtureDir = std::string(SY_SOURCE_DIR) + "/tests/fixtures/udhr";
const std::string kTwoLanguages = kFixtureDir + "/eng_rus.jsonl.gz";

fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("sy_multilingual_test_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

void write_file(const fs::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

// The documents' text as a plain reader sees it: each line's "text", in order.
std::vector<std::string> texts_of(const Corpus& c) {
  std::vector<std::string> out;
  for (const CorpusDoc& d : c.docs)
    out.push_back(std::string(c.train.begin() + d.train_begin, c.train.begin() + d.train_end) +
                  std::string(c.val.begin() + d.val_begin, c.val.begin() + d.val_end));
  return out;
}

TEST(LabelledCorpus, EachDocumentGivesItsEndToValidationFromALineStart) {
  const Corpus c = load_corpus(kTwoLanguages, 0.1, 64);
  ASSERT_EQ(c.docs.size(), 2u);
  EXPECT_EQ(c.docs[0].id, "eng");
  EXPECT_EQ(c.docs[0].script, "Latin");
  EXPECT_EQ(c.docs[0].language, "eng");
  EXPECT_EQ(c.docs[1].id, "rus");
  EXPECT_EQ(c.docs[1].script, "Cyrillic");
  EXPECT_EQ(c.scripts().size(), 2u);
  for (const CorpusDoc& d : c.docs) {
    const double n_train = double(d.train_end - d.train_begin), n_val = double(d.val_end - d.val_begin);
    // About a tenth, moved to the next line start (a paragraph is at most a few hundred bytes).
    EXPECT_NEAR(n_val / (n_train + n_val), 0.1, 0.03) << d.id;
    EXPECT_EQ(c.train[size_t(d.train_end - 1)], '\n') << d.id;
  }
  // Documents are contiguous and in file order in both splits.
  EXPECT_EQ(c.docs[0].train_begin, 0);
  EXPECT_EQ(c.docs[1].train_begin, c.docs[0].train_end);
  EXPECT_EQ(c.docs[1].val_begin, c.docs[0].val_end);
  EXPECT_EQ(c.docs[1].val_end, int64_t(c.val.size()));
  EXPECT_NE(texts_of(c)[0].find("Universal Declaration of Human Rights"), std::string::npos);
  // The two parts are the document cut once: another fraction cuts elsewhere, same bytes.
  const Corpus other = load_corpus(kTwoLanguages, 0.3, 64);
  EXPECT_EQ(texts_of(other), texts_of(c));
  EXPECT_GT(other.val.size(), 2 * c.val.size());
}

TEST(LabelledCorpus, ValidationWindowsScoreEveryHeldOutByteOnce) {
  const Corpus c = load_corpus(kTwoLanguages, 0.1, 64);
  for (int64_t seq_len : {64, 97}) {  // 97: windows that do not divide the parts
    const std::vector<Batch> batches = val_batches(c, 5, seq_len, 0);
    std::vector<int64_t> scored(c.docs.size());
    for (const Batch& b : batches) {
      ASSERT_EQ(b.doc.size(), b.tokens.size());
      for (size_t i = 0; i < b.tokens.size(); ++i) {
        if (b.targets[i] < 0) {
          EXPECT_EQ(b.doc[i], -1);
          continue;
        }
        ASSERT_GE(b.doc[i], 0);
        ++scored[size_t(b.doc[i])];
        // A target is the byte after its token, inside the same document's held-out part.
        if ((i + 1) % size_t(seq_len) != 0 && b.targets[i + 1] >= 0) {
          EXPECT_EQ(b.targets[i], b.tokens[i + 1]);
        }
      }
    }
    for (size_t d = 0; d < c.docs.size(); ++d)
      EXPECT_EQ(scored[d], c.docs[d].val_end - c.docs[d].val_begin - 1) << "doc " << d << " T " << seq_len;
  }
  // With a token budget, the windows are spread: both documents are sampled.
  std::set<int32_t> docs;
  for (const Batch& b : val_batches(c, 4, 64, 4 * 64))
    for (int32_t d : b.doc)
      if (d >= 0) docs.insert(d);
  EXPECT_EQ(docs.size(), 2u);
}

TEST(LabelledCorpus, BadFilesAreNamedErrors) {
  const fs::path dir = temp_dir("bad");
  const std::string doc = std::string("{\"id\": \"a\", \"text\": \"") + std::string(300, 'x') + "\\n" +
                          std::string(300, 'y') + "\"}\n";
  write_file(dir / "notjson.jsonl", doc + "{not json}\n");
  EXPECT_NE(error_of([&] { load_corpus((dir / "notjson.jsonl").string(), 0.1, 16); }).find("line 2: not JSON"),
            std::string::npos);
  write_file(dir / "notext.jsonl", "{\"id\": \"a\"}\n");
  EXPECT_NE(error_of([&] { load_corpus((dir / "notext.jsonl").string(), 0.1, 16); })
                .find("line 1: expected a non-empty string \"text\""),
            std::string::npos);
  write_file(dir / "dup.jsonl", doc + doc);
  EXPECT_NE(error_of([&] { load_corpus((dir / "dup.jsonl").string(), 0.1, 16); })
                .find("document id \"a\" again (first on line 1)"),
            std::string::npos);
  write_file(dir / "short.jsonl", doc + "{\"id\": \"b\", \"text\": \"hi\"}\n");
  EXPECT_NE(error_of([&] { load_corpus((dir / "short.jsonl").string(), 0.1, 16); })
                .find("document \"b\" of 2 bytes is too short"),
            std::string::npos);
  write_file(dir / "badid.jsonl", "{\"id\": 7, \"text\": \"abc\"}\n");
  EXPECT_NE(error_of([&] { load_corpus((dir / "badid.jsonl").string(), 0.1, 16); })
                .find("\"id\" is number, expected a string"),
            std::string::npos);
  write_file(dir / "array.jsonl", "[1, 2]\n");
  EXPECT_NE(error_of([&] { load_corpus((dir / "array.jsonl").string(), 0.1, 16); }).find("array where a document"),
            std::string::npos);
}

TEST(Extractor, ReproducesTheCommittedFixtureFromItsTarball) {
  if (std::system("python3 -c 'import tarfile' > /dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3 is not installed (scripts/setup.sh installs it)";
  const fs::path dir = temp_dir("extract");
  const std::string cmd = "python3 " + std::string(SY_SOURCE_DIR) + "/tools/extract_udhr.py " +
                          kFixtureDir + "/udhr-fixture.tgz " + (dir / "out.jsonl.gz").string() +
                          " > " + (dir / "log").string() + " 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const Corpus made = load_corpus((dir / "out.jsonl.gz").string(), 0.1, 64);
  const Corpus committed = load_corpus(kTwoLanguages, 0.1, 64);
  EXPECT_EQ(made.train, committed.train);
  EXPECT_EQ(made.val, committed.val);
  ASSERT_EQ(made.docs.size(), committed.docs.size());
  for (size_t i = 0; i < made.docs.size(); ++i) {
    EXPECT_EQ(made.docs[i].id, committed.docs[i].id);
    EXPECT_EQ(made.docs[i].script, committed.docs[i].script);
    EXPECT_EQ(made.docs[i].name, committed.docs[i].name);
  }
  // No markup survives, and the Cyrillic text is intact UTF-8.
  const std::vector<std::string> texts = texts_of(made);
  EXPECT_EQ(texts[0].find('<'), std::string::npos);
  EXPECT_NE(texts[1].find("Всеобщая декларация прав человека"), std::string::npos);
}

TEST(Specialisation, NmiIsOneForPerfectAndZeroForIndependent) {
  // Three labels, each to an expert of its own, equally often: 1.
  EXPECT_NEAR(normalized_mutual_information({{5, 0, 0}, {0, 5, 0}, {0, 0, 5}}), 1.0, 1e-12);
  // Independent: every row the same distribution, rows of different mass: 0.
  EXPECT_NEAR(normalized_mutual_information({{1, 2, 3}, {3, 6, 9}, {2, 4, 6}}), 0.0, 1e-12);
  // One label or one expert: nothing to share.
  EXPECT_EQ(normalized_mutual_information({{1, 2, 3}}), 0.0);
  EXPECT_EQ(normalized_mutual_information({{4}, {2}}), 0.0);
  // Against the definition computed by hand for a 2 x 2 table.
  const double p[2][2] = {{0.4, 0.1}, {0.2, 0.3}};
  const double px[2] = {0.5, 0.5}, py[2] = {0.6, 0.4};
  double mi = 0, hx = 0, hy = 0;
  for (int i = 0; i < 2; ++i) {
    hx -= px[i] * std::log(px[i]);
    hy -= py[i] * std::log(py[i]);
    for (int j = 0; j < 2; ++j) mi += p[i][j] * std::log(p[i][j] / (px[i] * py[j]));
  }
  EXPECT_NEAR(normalized_mutual_information({{4, 1}, {2, 3}}), 2 * mi / (hx + hy), 1e-12);
  // Two labels each spread over their own two experts: below 1, as H(expert) > H(label).
  const double half = normalized_mutual_information({{1, 1, 0, 0}, {0, 0, 1, 1}});
  EXPECT_NEAR(half, 2 * std::log(2.0) / (std::log(2.0) + std::log(4.0)), 1e-12);
  // ... while the expert still determines the label: all of its entropy explained.
  EXPECT_NEAR(label_entropy_explained({{1, 1, 0, 0}, {0, 0, 1, 1}}), 1.0, 1e-12);
  EXPECT_NEAR(label_entropy_explained({{1, 2, 3}, {3, 6, 9}}), 0.0, 1e-12);
  EXPECT_NEAR(label_entropy_explained({{4, 1}, {2, 3}}), mi / hx, 1e-12);
  EXPECT_EQ(char_class('a'), 0);
  EXPECT_EQ(char_class('Q'), 1);
  EXPECT_EQ(char_class('\n'), 4);
  EXPECT_EQ(char_class(0xD0), 6);  // lead byte of Cyrillic
  EXPECT_EQ(char_class(0x92), 7);
}

LmConfig tiny_moe() {
  LmConfig m;
  m.context = 32;
  m.d_model = 16;
  m.n_layers = 2;
  m.n_heads = 2;
  m.moe_every = 1;
  m.moe.n_experts = 4;
  m.moe.top_k = 2;
  m.moe.d_ff = 12;
  m.validate();
  return m;
}

// The tiny MoE model with random weights from a seed.
struct TinyModel {
  explicit TinyModel(uint64_t seed) : model(tiny_moe()), p(init_lm_params(model.config(), DType::kF32, seed)) {}
  LanguageModel model;
  LmParams p;
};

TEST(Specialisation, LabelledRoutesCountEverySlotAndSkipPadding) {
  const Corpus c = load_corpus(kTwoLanguages, 0.1, 32);
  const TinyModel tiny(3);
  const LmConfig& m = tiny.model.config();
  const std::vector<Batch> batches = val_batches(c, 6, 29, 0);
  int64_t text_positions = 0;
  for (const Batch& b : batches)
    for (int32_t d : b.doc) text_positions += d >= 0;
  const RouteAnalysis a = analyze_routes(tiny.model, tiny.p, batches, ExecContext{}, &c);
  EXPECT_EQ(a.n_tokens, text_positions);
  ASSERT_EQ(a.layers.size(), 2u);
  ASSERT_EQ(a.scripts.size(), 2u);
  for (const LayerRoutes& lr : a.layers) {
    ASSERT_EQ(lr.labels.size(), 3u);
    int64_t slots = 0;
    for (const ExpertProfile& ep : lr.experts) slots += ep.slots;
    EXPECT_EQ(slots, text_positions * m.moe.top_k);
    for (const LabelRoutes& t : lr.labels) {
      double sum = 0;
      for (const auto& row : t.slots) sum = std::accumulate(row.begin(), row.end(), sum);
      EXPECT_EQ(sum, double(slots)) << t.kind;
      EXPECT_GE(t.nmi, 0.0);
      EXPECT_LE(t.nmi, 1.0);
      EXPECT_GE(t.nmi_chance, 0.0);
      EXPECT_LE(t.nmi_chance, t.nmi + 0.05) << t.kind;
      // Expert e's column is what it was routed, whatever the labelling.
      for (size_t e = 0; e < 4; ++e) {
        double col = 0;
        for (const auto& row : t.slots) col += row[e];
        EXPECT_EQ(col, double(lr.experts[e].slots)) << t.kind << " expert " << e;
      }
    }
    EXPECT_EQ(lr.labels[1].group, c.doc_scripts());
  }
  const std::string text = render_routes_text(a);
  EXPECT_NE(text.find("language:"), std::string::npos);
  EXPECT_NE(text.find("Cyrillic"), std::string::npos);
  const std::string html = render_routes_html(a, "tiny");
  EXPECT_NE(html.find("language x expert"), std::string::npos);
  EXPECT_NE(html.find("rus: expert"), std::string::npos);
}

TEST(Specialisation, ManyLanguagesRenderAsOneImage) {
  // 100 languages in 4 scripts, 8 experts; each script's languages go to two experts of its own.
  RouteAnalysis a;
  a.n_tokens = 100 * 40;
  a.scripts = {"A", "B", "C", "D"};
  LayerRoutes lr;
  lr.experts.resize(8);
  lr.co_selected.assign(8, std::vector<int64_t>(8));
  LabelRoutes lang;
  lang.kind = "language";
  for (int i = 0; i < 100; ++i) {
    lang.names.push_back("lang" + std::to_string(i));
    lang.group.push_back(i % 4);
    std::vector<double> row(8);
    row[size_t(2 * (i % 4))] = 40, row[size_t(2 * (i % 4) + 1)] = 40;
    lang.slots.push_back(row);
  }
  lr.labels = {LabelRoutes{"character class", {"x"}, {}, {std::vector<double>(8, 1)}, 0, 0, 0}, lang};
  a.layers.push_back(lr);
  const std::string html = render_routes_html(a, "synthetic");
  EXPECT_NE(html.find("data:image/png;base64,iVBORw0KGgo"), std::string::npos);  // PNG signature
  EXPECT_LT(html.size(), 20000u);
  EXPECT_NE(html.find(">A (25)<"), std::string::npos);
}

TEST(Specialisation, PerDocumentLossesAddUpToThePlainLoss) {
  const Corpus c = load_corpus(kTwoLanguages, 0.1, 32);
  const TinyModel tiny(4);
  const std::vector<Batch> batches = val_batches(c, 7, 31, 0);
  const std::vector<DocLoss> by_doc = evaluate_by_doc(tiny.model, tiny.p, batches, 2, ExecContext{});
  double nats = 0;
  int64_t n = 0;
  for (const DocLoss& l : by_doc) nats += l.nats, n += l.targets;
  EXPECT_EQ(by_doc[0].targets, c.docs[0].val_end - c.docs[0].val_begin - 1);
  EXPECT_EQ(by_doc[1].targets, c.docs[1].val_end - c.docs[1].val_begin - 1);
  EXPECT_NEAR(nats / double(n), evaluate(tiny.model, tiny.p, batches, ExecContext{}), 1e-5);
  // Random weights: about log(256) per byte (more, as the initial logits are not flat).
  for (const DocLoss& l : by_doc) {
    EXPECT_GT(l.mean(), std::log(256.0) - 1);
    EXPECT_LT(l.mean(), std::log(256.0) + 2);
  }
}

TEST(Sweep, ConfigsKeepActiveFlopsEqualToDense) {
  const RunConfig moe = load_run_config("udhr-moe"), dense = load_run_config("udhr-dense");
  const std::vector<SweepRun> runs = plan_sweep(moe, dense, {4, 8, 16, 32, 64}, {1}, {1, 2});
  ASSERT_EQ(runs.size(), 8u);  // seed 1: dense + 5 MoE; seed 2: the main pair
  EXPECT_EQ(runs[0].name, "udhr-dense-s1");
  EXPECT_EQ(runs[4].name, "udhr-moe-e32-s1");
  EXPECT_EQ(runs[6].name, "udhr-dense-s2");
  EXPECT_EQ(runs[7].name, "udhr-moe-e32-s2");
  EXPECT_EQ(runs[7].cfg.train.seed, 2u);
  // FLOPs per token from each config's own parameter count (6 x active + attention), not from
  // the widths the generator chose.
  auto flops = [](const LmConfig& c) { return 6.0 * double(c.active_params() + c.attention_macs_per_token()); };
  const double dense_flops = flops(dense.model);
  for (const SweepRun& r : runs) {
    EXPECT_NEAR(flops(r.cfg.model) / dense_flops, 1.0, 0.005) << r.name;
    EXPECT_EQ(r.cfg.data.path, dense.data.path);
    EXPECT_EQ(r.cfg.train.steps, dense.train.steps);
    if (r.experts == 0) continue;
    EXPECT_EQ(r.cfg.model.moe.n_experts, r.experts);
    EXPECT_EQ(r.cfg.model.moe.d_ff % 8, 0);
    // Total parameters grow with E at fixed compute: what the sweep is about.
    EXPECT_GT(r.cfg.model.total_params(), dense.model.total_params() * r.experts / 8);
  }
  // The built-in udhr-moe is the sweep's own E = 32 config.
  EXPECT_EQ(runs[4].cfg.model.moe.d_ff, moe.model.moe.d_ff);
  EXPECT_NE(error_of([&] { plan_sweep(moe, dense, {1}, {1}, {}); }).find("expected at least top_k"),
            std::string::npos);
  RunConfig other = dense;
  other.train.steps += 1;
  EXPECT_NE(error_of([&] { plan_sweep(moe, other, {8}, {1}, {}); }).find("differ in train.steps"),
            std::string::npos);
  EXPECT_NE(error_of([&] { plan_sweep(dense, dense, {8}, {1}, {}); }).find("has no MoE layer"),
            std::string::npos);
}

TEST(Sweep, ReportCountsStepsToDenseLossAndLanguagesHelped) {
  const RunConfig moe = load_run_config("udhr-moe"), dense = load_run_config("udhr-dense");
  const std::vector<SweepRun> runs = plan_sweep(moe, dense, {8}, {1}, {});
  std::vector<SweepResult> results(2);
  results[0].run = runs[0];
  results[1].run = runs[1];
  for (int64_t s = 50; s <= 200; s += 50) {
    results[0].history.evals.push_back({s, 3.0 - 0.001 * double(s)});  // dense ends at 2.8
    results[1].history.evals.push_back({s, 2.95 - 0.002 * double(s)});  // 2.85, 2.75, ...
  }
  results[0].final_val_loss = 2.8;
  results[1].final_val_loss = 2.55;
  EXPECT_EQ(steps_to_reach(results[1].history, 2.8), 100);
  EXPECT_EQ(steps_to_reach(results[0].history, 1.0), -1);
  std::vector<CorpusDoc> docs(3);
  for (int i = 0; i < 3; ++i) docs[size_t(i)].id = docs[size_t(i)].name = "l" + std::to_string(i), docs[size_t(i)].script = "Latin";
  results[0].doc_loss = {{10, 10}, {20, 10}, {30, 10}};
  results[1].doc_loss = {{9, 10}, {21, 10}, {29, 10}};
  for (SweepResult& r : results) {
    double nats = 0, n = 0;
    for (const DocLoss& l : r.doc_loss) nats += l.nats, n += double(l.targets);
    r.val_loss_all = nats / n;
  }
  const std::string md = render_sweep_markdown(results, docs);
  EXPECT_NE(md.find("| 100 | 2.00x |"), std::string::npos) << md;
  EXPECT_NE(md.find("2 of 3 (67%)"), std::string::npos) << md;
  EXPECT_NE(md.find("| l0 | l0 | Latin | 1.0000 | 0.9000 | +0.1000 |"), std::string::npos) << md;
}

}  // namespace
}  // namespace sy
