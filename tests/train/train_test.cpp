// Training: resume continues to exactly the losses of an unbroken run; configs, checkpoints and
// data files that are wrong fail with errors that name them, and nothing on disk is clobbered.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>

#include "switchyard/io/safetensors.h"
#include "switchyard/train/checkpoint.h"
#include "switchyard/train/optimizer.h"
#include "switchyard/train/trainer.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

// A fresh directory per test under the system temp dir.
fs::path temp_dir(const std::string& name) {
  fs::path p = fs::temp_directory_path() / ("sy_train_test_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}
void write_file(const fs::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary) << s;
}

// A small corpus of varied text (not zeros, not one repeated byte).
fs::path make_corpus(const fs::path& dir) {
  std::string text;
  for (int i = 0; i < 400; ++i)
    text += "Line " + std::to_string(i * 37 % 101) + ": the quick brown fox, jumping " +
            std::to_string(i) + " times.\n";
  write_file(dir / "corpus.txt", text);
  return dir / "corpus.txt";
}

// clang-format off
std::string tiny_config_json(const fs::path& data, const std::string& gating = "softmax_topk") {
  return R"({
    "model": {"vocab": 256, "context": 16, "d_model": 16, "n_layers": 2, "n_heads": 2,
              "moe_every": 1, "d_ff": 24,
              "moe": {"n_experts": 4, "top_k": 2, "d_ff": 12, "router": ")" + gating + R"("}},
    "train": {"steps": 6, "batch": 3, "lr": 0.01, "min_lr": 0.001, "warmup": 2,
              "eval_interval": 3, "eval_tokens": 64, "checkpoint_interval": 2, "seed": 5},
    "data": {"path": ")" + data.string() + R"(", "val_fraction": 0.1}
  })";
}

// clang-format on

TrainOptions quiet(const fs::path& out) {
  TrainOptions o;
  o.out_dir = out.string();
  o.log = nullptr;
  return o;
}

class ResumeTest : public ::testing::TestWithParam<std::string> {};

TEST_P(ResumeTest, ContinuesToTheSameLossesAsAnUnbrokenRun) {
  const fs::path dir = temp_dir("resume_" + GetParam());
  const RunConfig cfg = parse_run_config(tiny_config_json(make_corpus(dir), GetParam()), "tiny");
  const TrainResult whole = train(cfg, quiet(dir / "whole"));
  ASSERT_EQ(whole.steps_done, 6);

  TrainOptions first = quiet(dir / "split");
  first.stop_after = 3;  // as if Ctrl-C came during step 3
  const TrainResult part = train(cfg, first);
  EXPECT_TRUE(part.interrupted);
  EXPECT_EQ(part.steps_done, 3);
  TrainOptions second = quiet(dir / "split");
  second.resume = true;
  const TrainResult rest = train(cfg, second);
  ASSERT_EQ(rest.steps_done, 6);

  ASSERT_EQ(rest.history.steps.size(), whole.history.steps.size());
  for (size_t i = 0; i < whole.history.steps.size(); ++i)
    EXPECT_EQ(rest.history.steps[i].loss, whole.history.steps[i].loss) << "step " << i + 1;
  EXPECT_EQ(rest.final_val_loss, whole.final_val_loss);
  const Checkpoint a = load_checkpoint(whole.checkpoint, true),
                   b = load_checkpoint(rest.checkpoint, true);
  for (size_t i = 0; i < a.params.named().size(); ++i) {
    const Tensor& ta = *a.params.named()[i].second;
    const Tensor& tb = *b.params.named()[i].second;
    ASSERT_EQ(0, std::memcmp(ta.bytes(), tb.bytes(), ta.nbytes())) << a.params.named()[i].first;
  }
  EXPECT_NE(read_file(whole.report).find("<svg"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Gating, ResumeTest, ::testing::Values("softmax_topk", "sigmoid_bias"));

// Mixed precision tracks f32: 30 steps of the same run in bf16 compute stay within 3% of the
// f32 loss at every step, and the final validation loss within 2%. bf16 rounds each GEMM input
// by up to 2^-8 relative; the tiny model memorises its corpus at lr 0.01, so the two runs drift
// apart step by step (measured here: at most 1.7% at any step, 0.6% at the end).
TEST(Training, Bf16TracksF32Over30Steps) {
  if (cpu_features().isa < Isa::kAvx512Bf16)
    GTEST_SKIP() << "no AVX512-BF16: " << cpu_features().describe();
  const fs::path dir = temp_dir("bf16");
  const fs::path data = make_corpus(dir);
  RunConfig f32 = parse_run_config(
      tiny_config_json(data), "tiny",
      {"train.steps=30", "train.eval_interval=30", "model.d_model=32", "model.moe.d_ff=32"});
  RunConfig bf16 = parse_run_config(tiny_config_json(data), "tiny",
                                    {"train.steps=30", "train.eval_interval=30", "model.d_model=32",
                                     "model.moe.d_ff=32", "model.precision=bf16"});
  const TrainResult a = train(f32, quiet(dir / "f32")), b = train(bf16, quiet(dir / "bf16"));
  ASSERT_EQ(a.history.steps.size(), 30u);
  ASSERT_EQ(b.history.steps.size(), 30u);
  double worst = 0;
  for (size_t i = 0; i < 30; ++i) {
    const double la = a.history.steps[i].loss, lb = b.history.steps[i].loss;
    worst = std::max(worst, std::abs(la - lb) / la);
    EXPECT_LE(std::abs(la - lb), 0.03 * la) << "step " << i + 1;
  }
  EXPECT_LE(std::abs(a.final_val_loss - b.final_val_loss), 0.02 * a.final_val_loss);
  EXPECT_NE(a.history.steps.back().loss, b.history.steps.back().loss) << "bf16 ran in f32";
  EXPECT_LT(b.history.steps.back().loss, b.history.steps.front().loss);
  std::printf(
      "bf16 vs f32 over 30 steps: worst relative loss difference %.5f, final val %.4f vs %.4f\n",
      worst, b.final_val_loss, a.final_val_loss);
  // The checkpoint says which kernels trained it.
  const std::string meta = read_file(b.checkpoint);
  EXPECT_NE(meta.find("onednn-bf16"), std::string::npos);
}

TEST(Training, LossFallsOnTinyCorpus) {
  const fs::path dir = temp_dir("falls");
  RunConfig cfg = parse_run_config(tiny_config_json(make_corpus(dir)), "tiny",
                                   {"train.steps=40", "train.eval_interval=40"});
  const TrainResult r = train(cfg, quiet(dir / "run"));
  EXPECT_LT(r.history.steps.back().loss, r.history.steps.front().loss - 1.0);
}

TEST(Training, ExistingCheckpointIsNeverOverwrittenWithoutResume) {
  const fs::path dir = temp_dir("clobber");
  const RunConfig cfg = parse_run_config(tiny_config_json(make_corpus(dir)), "tiny");
  const TrainResult r = train(cfg, quiet(dir / "run"));
  const std::string before = read_file(r.checkpoint);
  EXPECT_THROW(train(cfg, quiet(dir / "run")), ConfigError);
  // A resume of another model fails before writing anything.
  RunConfig other = parse_run_config(tiny_config_json(dir / "corpus.txt"), "tiny",
                                     {"model.d_model=32", "train.steps=8"});
  TrainOptions o = quiet(dir / "run");
  o.resume = true;
  try {
    train(other, o);
    ADD_FAILURE() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("is of another model"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_file(r.checkpoint), before);
  EXPECT_FALSE(fs::exists(r.checkpoint + ".tmp"));
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Checkpoint, BadFilesNameTheFileAndWhatWasExpected) {
  const fs::path dir = temp_dir("badckpt");
  const RunConfig cfg = parse_run_config(tiny_config_json(make_corpus(dir)), "tiny");
  const TrainResult r = train(cfg, quiet(dir / "run"));
  const std::string good = read_file(r.checkpoint);

  write_file(dir / "truncated.st", good.substr(0, good.size() / 2));
  EXPECT_NE(
      error_of([&] { load_checkpoint((dir / "truncated.st").string(), false); }).find("truncated"),
      std::string::npos);
  write_file(dir / "short.st", good.substr(0, 5));
  EXPECT_NE(error_of([&] { load_checkpoint((dir / "short.st").string(), false); }).find("short.st"),
            std::string::npos);
  write_file(dir / "junk.st", std::string(64, 'x'));
  EXPECT_NE(error_of([&] {
              load_checkpoint((dir / "junk.st").string(), false);
            }).find("not a valid safetensors"),
            std::string::npos);

  // Tensors of the wrong shape or dtype, or a safetensors file that is not ours.
  SafetensorsFile f = read_safetensors(r.checkpoint);
  auto rewrite = [&](const std::string& name, Tensor t, std::map<std::string, std::string> meta) {
    std::vector<std::pair<std::string, const Tensor*>> list;
    Tensor keep = std::move(t);
    for (auto& [n, v] : f.tensors) list.emplace_back(n, n == name ? &keep : &v);
    write_safetensors((dir / "edited.st").string(), list, meta);
  };
  rewrite("model.lm_head", Tensor({16, 255}, DType::kF32), f.metadata);
  EXPECT_NE(error_of([&] {
              load_checkpoint((dir / "edited.st").string(), false);
            }).find("tensor model.lm_head is [16, 255] f32: expected [16, 256] f32"),
            std::string::npos);
  rewrite("model.lm_head", Tensor({16, 256}, DType::kF64), f.metadata);
  EXPECT_NE(error_of([&] {
              load_checkpoint((dir / "edited.st").string(), false);
            }).find("expected [16, 256] f32"),
            std::string::npos);
  auto meta = f.metadata;
  meta["format"] = "something-else";
  rewrite("", Tensor(), meta);
  EXPECT_NE(error_of([&] {
              load_checkpoint((dir / "edited.st").string(), false);
            }).find("expected \"switchyard-lm\""),
            std::string::npos);
  meta = f.metadata;
  meta["model_hash"] = "0000000000000000";
  rewrite("", Tensor(), meta);
  EXPECT_NE(error_of([&] { load_checkpoint((dir / "edited.st").string(), false); }).find("altered"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { load_checkpoint((dir / "missing.st").string(), false); }).find("missing.st"),
      std::string::npos);
  // A checkpoint from before a config key existed: the key absent from the stored config, the
  // hash over the config as stored. It loads, and the key takes its default.
  nlohmann::json old = nlohmann::json::parse(f.metadata["config"]);
  old["model"]["moe"].erase("loss_load_weight");
  meta = f.metadata;
  meta["config"] = old.dump();
  meta["model_hash"] = fmt::format("{:016x}", fnv1a(old["model"].dump()));
  rewrite("", Tensor(), meta);
  const Checkpoint ck = load_checkpoint((dir / "edited.st").string(), false);
  EXPECT_EQ(ck.cfg.model.moe.loss_load_weight, MoeConfig{}.loss_load_weight);
}

// The header as JSON, and a file put back together from an edited one and the same data.
nlohmann::json header_of(const std::string& file) {
  uint64_t n = 0;
  std::memcpy(&n, file.data(), 8);
  return nlohmann::json::parse(file.substr(8, n));
}
std::string with_header(const std::string& file, const nlohmann::json& header) {
  uint64_t n = 0;
  std::memcpy(&n, file.data(), 8);
  const std::string h = header.dump();
  std::string out(8, '\0');
  const uint64_t m = h.size();
  std::memcpy(out.data(), &m, 8);
  return out + h + file.substr(8 + n);
}

TEST(Checkpoint, ChecksumsCatchDamageAndOlderFilesStillLoad) {
  const fs::path dir = temp_dir("cksum");
  const RunConfig cfg = parse_run_config(tiny_config_json(make_corpus(dir)), "tiny");
  const TrainResult r = train(cfg, quiet(dir / "run"));
  const std::string good = read_file(r.checkpoint);
  const nlohmann::json header = header_of(good);
  ASSERT_TRUE(header["__metadata__"].contains(kChecksumKey));
  EXPECT_EQ(header["__metadata__"]["version"], std::to_string(kCheckpointVersion));

  // One flipped bit in each tensor's data (the optimizer's too): named, nothing returned.
  uint64_t n = 0;
  std::memcpy(&n, good.data(), 8);
  int flipped = 0;
  for (const auto& [name, item] : header.items()) {
    if (name == "__metadata__") continue;
    const uint64_t b = item["data_offsets"][0], e = item["data_offsets"][1];
    if (e == b) continue;
    std::string bad = good;
    bad[8 + n + b + (e - b) * 3 / 7] ^= 0x10;
    write_file(dir / "flip.st", bad);
    const std::string err = error_of([&] { load_checkpoint((dir / "flip.st").string(), true); });
    EXPECT_NE(err.find("tensor " + name + " fails its checksum"), std::string::npos) << err;
    EXPECT_NE(err.find("flip.st"), std::string::npos) << err;
    ++flipped;
  }
  EXPECT_GT(flipped, 10);

  // A history digit changed: the metadata checksum.
  nlohmann::json h = header;
  std::string hist = h["__metadata__"]["history"];
  hist[hist.find_first_of("123456789")] = hist[hist.find_first_of("123456789")] == '1' ? '2' : '1';
  h["__metadata__"]["history"] = hist;
  write_file(dir / "hist.st", with_header(good, h));
  EXPECT_NE(error_of([&] { load_checkpoint((dir / "hist.st").string(), false); })
                .find("metadata fails its checksum"),
            std::string::npos);

  // The checksums removed: refused at this version, loaded unchecked as version 1 (written
  // before checksums existed).
  h = header;
  h["__metadata__"].erase(kChecksumKey);
  write_file(dir / "nosum.st", with_header(good, h));
  EXPECT_NE(error_of([&] { load_checkpoint((dir / "nosum.st").string(), false); })
                .find("without its checksums"),
            std::string::npos);
  h["__metadata__"]["version"] = "1";
  write_file(dir / "v1.st", with_header(good, h));
  const Checkpoint v1 = load_checkpoint((dir / "v1.st").string(), true);
  const Checkpoint v2 = load_checkpoint(r.checkpoint, true);
  EXPECT_EQ(v1.step, v2.step);
  EXPECT_EQ(std::memcmp(v1.params.lm_head.bytes(), v2.params.lm_head.bytes(),
                        v2.params.lm_head.nbytes()),
            0);
  h["__metadata__"]["version"] = "3";
  write_file(dir / "v3.st", with_header(good, h));
  EXPECT_NE(error_of([&] { load_checkpoint((dir / "v3.st").string(), false); })
                .find("this build reads versions 1 to 2"),
            std::string::npos);

  // Counts that are not counts.
  for (const char* key : {"step", "adam_steps"}) {
    h = header;
    h["__metadata__"][key] = "12abc";
    h["__metadata__"].erase(kChecksumKey);
    h["__metadata__"]["version"] = "1";
    write_file(dir / "count.st", with_header(good, h));
    EXPECT_NE(error_of([&] { load_checkpoint((dir / "count.st").string(), true); })
                  .find(fmt::format("{} \"12abc\": expected a count", key)),
              std::string::npos)
        << key;
  }
}

TEST(Config, ErrorsNameTheKey) {
  const std::string base = tiny_config_json("data.txt");
  EXPECT_NE(error_of([&] {
              parse_run_config(base, "c", {"train.lrr=1"});
            }).find("train.lrr: unknown key"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              parse_run_config(base, "c", {"train.lr=\"fast\""});
            }).find("train.lr = \"fast\": expected a number"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { parse_run_config(base, "c", {"model.n_heads=3"}); }).find("model.n_heads = 3"),
      std::string::npos);
  EXPECT_NE(
      error_of([&] { parse_run_config(base, "c", {"model.moe.top_k=9"}); }).find("moe.top_k = 9"),
      std::string::npos);
  EXPECT_NE(error_of([&] {
              parse_run_config("{\"model\": [1,", "broken.json");
            }).find("broken.json: not valid JSON"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              load_run_config("no-such-config");
            }).find("built in: austen-dense, austen-moe"),
            std::string::npos);
  // The built-in configs parse, and the two defaults have equal active FLOPs in their FFNs.
  const RunConfig moe = load_run_config("austen-moe"), dense = load_run_config("austen-dense");
  EXPECT_EQ(moe.model.active_params() - 4 * 256 * 8, dense.model.active_params());
}

TEST(Data, MissingEmptyAndCorruptFilesAreClearErrors) {
  const fs::path dir = temp_dir("data");
  EXPECT_NE(error_of([&] {
              load_corpus((dir / "nope.txt").string(), 0.1, 16);
            }).find("nope.txt: not found"),
            std::string::npos);
  write_file(dir / "empty.txt", "");
  EXPECT_NE(error_of([&] { load_corpus((dir / "empty.txt").string(), 0.1, 16); }).find("empty"),
            std::string::npos);
  write_file(dir / "short.txt", "hello world");
  EXPECT_NE(error_of([&] { load_corpus((dir / "short.txt").string(), 0.1, 16); }).find("too short"),
            std::string::npos);
  write_file(dir / "bad.gz",
             std::string("\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage-not-deflate", 30));
  EXPECT_NE(error_of([&] { load_corpus((dir / "bad.gz").string(), 0.1, 4); }).find("bad.gz"),
            std::string::npos);
}

TEST(Data, BatchesAreAPureFunctionOfSeedAndStep) {
  const fs::path dir = temp_dir("batches");
  const Corpus c = load_corpus(make_corpus(dir).string(), 0.1, 16);
  const Batch a = train_batch(c, 4, 16, 7, 3), b = train_batch(c, 4, 16, 7, 3),
              other = train_batch(c, 4, 16, 7, 4);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_NE(a.tokens, other.tokens);
  for (size_t i = 0; i + 1 < a.tokens.size(); ++i)
    if ((i + 1) % 16 != 0) {
      EXPECT_EQ(a.targets[i], a.tokens[i + 1]);
    }
}

TEST(Optimizer, ScheduleWarmsUpThenDecaysToMin) {
  TrainConfig t;
  t.steps = 100, t.warmup = 10, t.lr = 1.0, t.min_lr = 0.1;
  EXPECT_DOUBLE_EQ(learning_rate(t, 0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(t, 9), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(t, 10), 1.0);
  EXPECT_NEAR(learning_rate(t, 55), 0.55, 1e-12);
  EXPECT_NEAR(learning_rate(t, 100), 0.1, 1e-12);
}

TEST(Optimizer, AdamWFirstStepIsSignedLrPlusDecay) {
  LmConfig m;
  m.vocab = 5, m.context = 4, m.d_model = 4, m.n_layers = 1, m.n_heads = 1, m.moe_every = 0,
  m.d_ff = 6;
  LmParams p = init_lm_params(m, DType::kF32, 1), g = zeros_like(p);
  const float w0 = p.lm_head.data<float>()[3], n0 = p.norm_out.data<float>()[1];
  g.lm_head.data<float>()[3] = -0.25f;
  g.norm_out.data<float>()[1] = 2.0f;
  TrainConfig t;
  t.weight_decay = 0.5;
  AdamW adam(t, p);
  adam.step(p, g, 0.01);
  // Bias-corrected first step: m_hat / sqrt(v_hat) = sign(g); decay only on matrices.
  EXPECT_NEAR(p.lm_head.data<float>()[3], w0 + 0.01f - 0.01f * 0.5f * w0, 1e-6);
  EXPECT_NEAR(p.norm_out.data<float>()[1], n0 - 0.01f, 1e-6);
}

}  // namespace
}  // namespace sy
