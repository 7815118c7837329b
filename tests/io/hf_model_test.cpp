// Hugging Face model directories against transformers: the logits of every prompt position and
// 32 greedy tokens (tests/fixtures/hf/models/*, made by transformers itself), and the errors a
// malformed directory gets.
#include "switchyard/io/hf_model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/fixtures.h"
#include "switchyard/io/hf_export.h"
#include "switchyard/io/safetensors.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/nn/model.h"

namespace sy {
namespace {

namespace fs = std::filesystem;

using testing::fixture;
std::string read(const std::string& path) { return testing::read_file(path); }

void write(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

ExecContext f32_context() {
  ExecContext ctx;
  ctx.backend = &pick_backend(cpu_features(), Precision::kF32);
  ctx.training = false;
  return ctx;
}

int32_t argmax(const float* row, int64_t n) {
  return int32_t(std::max_element(row, row + n) - row);
}

class HfFixture : public ::testing::TestWithParam<std::string> {};

// Tolerance: transformers' own float32 logits differ from its float64 run by `f32_vs_f64_max_abs`
// (about 1e-6 here); ours and theirs are two float32 computations in different summation
// orders, so each is that far from the exact answer and the two at most twice as far apart.
// We allow 8x that gap (floor 1e-5): loose enough for any reordering, tight enough that a
// wrong norm, scale, rope angle or routing decision (errors of 1e-3 and up) cannot pass.
TEST_P(HfFixture, LogitsAndGreedyTokensEqualTransformers) {
  const std::string dir = fixture("models/" + GetParam());
  const HfModel m = load_hf_model(dir);
  const auto want = nlohmann::json::parse(read(dir + "/expected.json"));
  const auto ids = want["input_ids"].get<std::vector<int32_t>>();
  ASSERT_TRUE(m.tokenizer.has_value());
  EXPECT_EQ(m.tokenizer->encode(want["prompt"].get<std::string>()), ids);

  const DecoderModel model(m.config);
  const ExecContext ctx = f32_context();
  DecoderState s = model.start();
  Tensor logits;
  model.forward(m.params, ids, s, logits, ctx);
  const SafetensorsFile ref = read_safetensors(dir + "/logits.safetensors");
  const Tensor& r = ref.tensors.at("logits");
  ASSERT_EQ(logits.shape(), r.shape());
  double worst = 0;
  for (int64_t i = 0; i < r.numel(); ++i)
    worst = std::max(worst, double(std::abs(logits.data<float>()[i] - r.data<float>()[i])));
  const double tol = std::max(1e-5, 8 * want["f32_vs_f64_max_abs"].get<double>());
  EXPECT_LE(worst, tol) << GetParam() << ": largest logit difference";
  RecordProperty("max_abs_logit_diff", fmt::format("{:.3g}", worst));

  const int64_t V = m.config.vocab;
  std::vector<int32_t> greedy;
  int32_t next = argmax(logits.data<float>() + (int64_t(ids.size()) - 1) * V, V);
  for (int i = 0; i < 32; ++i) {
    greedy.push_back(next);
    if (i == 31) break;
    const int32_t tok[1] = {next};
    model.forward(m.params, tok, s, logits, ctx);
    next = argmax(logits.data<float>(), V);
  }
  EXPECT_EQ(greedy, want["greedy"].get<std::vector<int32_t>>()) << GetParam();
}

// Three sequences batched (unequal prompts from the fixture's ids, then steps that mix one-token
// decodes with a prefill chunk): each sequence's logits are what forward() gives it alone, for
// every architecture (GQA, sliding windows, q/k norms, MLA, shared experts, dense first layers).
TEST_P(HfFixture, ForwardBatchEqualsEachSequenceAlone) {
  const std::string dir = fixture("models/" + GetParam());
  const HfModel m = load_hf_model(dir);
  const auto ids =
      nlohmann::json::parse(read(dir + "/expected.json"))["input_ids"].get<std::vector<int32_t>>();
  ASSERT_GE(ids.size(), 7u);
  const DecoderModel model(m.config);
  const ExecContext ctx = f32_context();
  const int64_t V = m.config.vocab;
  auto slice = [&](size_t a, size_t n) {
    return std::vector<int32_t>(ids.begin() + long(a), ids.begin() + long(a + n));
  };
  // steps[t][q]: what sequence q feeds at step t.
  const std::vector<std::vector<std::vector<int32_t>>> steps = {
      {slice(0, 5), slice(1, 1), slice(2, 7)},
      {slice(3, 1), slice(0, 4), slice(4, 1)},
      {slice(5, 2), slice(6, 1), slice(1, 1)}};
  std::vector<DecoderState> batched, alone;
  for (int q = 0; q < 3; ++q) {
    batched.push_back(model.start());
    alone.push_back(model.start());
  }
  for (size_t t = 0; t < steps.size(); ++t) {
    std::vector<std::span<const int32_t>> tokens(steps[t].begin(), steps[t].end());
    std::vector<DecoderState*> states = {&batched[0], &batched[1], &batched[2]};
    Tensor logits, want;
    model.forward_batch(m.params, tokens, states, logits, ctx);
    ASSERT_EQ(logits.shape(), (std::vector<int64_t>{3, V}));
    for (int q = 0; q < 3; ++q) {
      model.forward(m.params, steps[t][q], alone[q], want, ctx, /*all_positions=*/false);
      EXPECT_EQ(batched[q].n_pos, alone[q].n_pos);
      double worst = 0;
      for (int64_t v = 0; v < V; ++v)
        worst = std::max(worst,
                         double(std::abs(logits.data<float>()[q * V + v] - want.data<float>()[v])));
      EXPECT_LE(worst, 1e-5) << GetParam() << " step " << t << " sequence " << q;
    }
  }
  // A sequence past the context is refused before any state moves.
  const std::vector<int32_t> one = {ids[0]}, too_long(size_t(m.config.max_context), ids[0]);
  const std::span<const int32_t> tokens[2] = {one, too_long};
  DecoderState* const states[2] = {&batched[0], &batched[1]};
  const int64_t before = batched[0].n_pos;
  Tensor logits;
  EXPECT_THROW(model.forward_batch(m.params, tokens, states, logits, ctx), ShapeError);
  EXPECT_EQ(batched[0].n_pos, before);
}

INSTANTIATE_TEST_SUITE_P(Architectures, HfFixture,
                         ::testing::Values("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe",
                                           "qwen3_moe", "olmoe", "deepseek_v3"));

TEST(HfModel, Bf16WeightsStayBf16) {
  const HfModel m = load_hf_model(fixture("models/qwen3_moe"));
  EXPECT_EQ(m.weights_dtype, "bf16");
  EXPECT_EQ(m.params.layers[1].moe.w1.dtype(), DType::kBF16);
  EXPECT_EQ(m.params.layers[0].wq.dtype(), DType::kBF16);
}

// A scratch copy of a fixture directory to break.
struct Scratch {
  fs::path dir;
  explicit Scratch(const std::string& name) {
    dir = fs::temp_directory_path() / fmt::format("sy_hf_{}_{}", name, ::getpid());
    fs::remove_all(dir);
    fs::create_directories(dir);
    for (const auto& e : fs::directory_iterator(fixture("models/mixtral")))
      fs::copy_file(e.path(), dir / e.path().filename());
  }
  ~Scratch() { fs::remove_all(dir); }
  void set_config(const std::string& key, const nlohmann::json& v) const {
    auto j = nlohmann::json::parse(read((dir / "config.json").string()));
    j[key] = v;
    write(dir / "config.json", j.dump());
  }
  // Rewrites model.safetensors with `edit` applied to its tensors.
  template <class Fn>
  void edit_weights(Fn&& edit) const {
    SafetensorsFile f = read_safetensors((dir / "model.safetensors").string());
    edit(f.tensors);
    std::vector<std::pair<std::string, const Tensor*>> list;
    for (auto& [name, t] : f.tensors) list.emplace_back(name, &t);
    write_safetensors((dir / "model.safetensors").string(), list, f.metadata);
  }
};

std::string load_error(const fs::path& dir) {
  try {
    load_hf_model(dir.string());
  } catch (const Error& e) {
    return e.what();
  }
  return "(loaded)";
}

TEST(HfModel, UnknownModelTypeListsTheSupported) {
  Scratch s("type");
  s.set_config("model_type", "gpt_oss");
  const std::string e = load_error(s.dir);
  EXPECT_NE(e.find("model_type \"gpt_oss\" is not supported; supported: mixtral, qwen2_moe"),
            std::string::npos)
      << e;
}

TEST(HfModel, MissingExtraAndMisshapenTensorsAreNamed) {
  {
    Scratch s("missing");
    s.edit_weights([](auto& t) { t.erase("model.layers.1.block_sparse_moe.experts.2.w3.weight"); });
    const std::string e = load_error(s.dir);
    EXPECT_NE(e.find("missing tensor model.layers.1.block_sparse_moe.experts.2.w3.weight"),
              std::string::npos)
        << e;
  }
  {
    Scratch s("extra");
    s.edit_weights([](auto& t) {
      t.emplace("model.layers.0.mlp.surprise.weight", Tensor({2, 2}, DType::kF32));
    });
    const std::string e = load_error(s.dir);
    EXPECT_NE(e.find("not part of a mixtral model with this config.json, first "
                     "model.layers.0.mlp.surprise.weight"),
              std::string::npos)
        << e;
  }
  {
    Scratch s("shape");
    s.set_config("intermediate_size", 40);
    const std::string e = load_error(s.dir);
    EXPECT_NE(e.find("has shape [48, 48], expected [40, 48] from config.json"), std::string::npos)
        << e;
  }
}

TEST(HfModel, ShardMissingFromTheIndexIsNamed) {
  Scratch s("shards");
  const MappedSafetensors f((s.dir / "model.safetensors").string());
  nlohmann::json index;
  for (const auto& [name, e] : f.entries())
    index["weight_map"][name] = name.find("layers.1.") != std::string::npos
                                    ? "model-00002-of-00002.safetensors"
                                    : "model.safetensors";
  write(s.dir / "model.safetensors.index.json", index.dump());
  const std::string e = load_error(s.dir);
  EXPECT_NE(e.find("shard model-00002-of-00002.safetensors (holding model.layers.1."),
            std::string::npos)
      << e;
}

TEST(HfModel, ShardedDirectoryLoadsAsTheSingleFile) {
  Scratch s("sharded_ok");
  SafetensorsFile all = read_safetensors((s.dir / "model.safetensors").string());
  std::vector<std::pair<std::string, const Tensor*>> a, b;
  nlohmann::json index;
  for (auto& [name, t] : all.tensors) {
    const bool second = name.find("layers.1.") != std::string::npos;
    (second ? b : a).emplace_back(name, &t);
    index["weight_map"][name] = second ? "model-2.safetensors" : "model-1.safetensors";
  }
  write_safetensors((s.dir / "model-1.safetensors").string(), a, {});
  write_safetensors((s.dir / "model-2.safetensors").string(), b, {});
  fs::remove(s.dir / "model.safetensors");
  write(s.dir / "model.safetensors.index.json", index.dump());
  const HfModel sharded = load_hf_model(s.dir.string());
  const HfModel single = load_hf_model(fixture("models/mixtral"));
  const ExecContext ctx = f32_context();
  const DecoderModel model(single.config);
  const std::vector<int32_t> ids = {1, 40, 41, 42, 43};
  Tensor la, lb;
  DecoderState sa = model.start(), sb = model.start();
  model.forward(single.params, ids, sa, la, ctx);
  model.forward(sharded.params, ids, sb, lb, ctx);
  ASSERT_EQ(la.numel(), lb.numel());
  for (int64_t i = 0; i < la.numel(); ++i) ASSERT_EQ(la.data<float>()[i], lb.data<float>()[i]);
}

TEST(HfModel, HubStyleRopeFieldsReadAsRopeParameters) {
  Scratch s("legacy_rope");
  auto j = nlohmann::json::parse(read((s.dir / "config.json").string()));
  const double theta = j["rope_parameters"]["rope_theta"].get<double>();
  j.erase("rope_parameters");
  j["rope_theta"] = theta;
  write(s.dir / "config.json", j.dump());
  const HfModel m = load_hf_model(s.dir.string());
  EXPECT_EQ(m.config.rope.theta, theta);
  EXPECT_EQ(m.config.rope.type, "default");
}

TEST(HfModel, PastTheContextIsAShapeError) {
  const HfModel m = load_hf_model(fixture("models/olmoe"));
  const DecoderModel model(m.config);
  DecoderState s = model.start();
  Tensor logits;
  std::vector<int32_t> ids(size_t(m.config.max_context + 1), 3);
  EXPECT_THROW(model.forward(m.params, ids, s, logits, f32_context()), ShapeError);
  const int32_t bad[1] = {int32_t(m.config.vocab)};
  EXPECT_THROW(model.forward(m.params, bad, s, logits, f32_context()), ShapeError);
}

}  // namespace
}  // namespace sy

namespace sy {
namespace {

LmConfig small_lm(int64_t moe_every) {
  LmConfig c;
  c.vocab = 256, c.context = 64, c.d_model = 32, c.n_layers = 2, c.n_heads = 2;
  c.moe_every = moe_every, c.d_ff = 40;
  c.moe.n_experts = 4, c.moe.top_k = 2, c.moe.d_ff = 24, c.moe.dropless = true;
  return c;
}

// Switchyard -> Hugging Face directory -> the loader that matches transformers: equal logits.
// Tolerance 1e-4: Switchyard's own attention takes RoPE angles in double, transformers' (and the
// loader's) in float32, which moves logits by ~1e-5 at these positions.
void expect_export_round_trip(int64_t moe_every) {
  const LmConfig cfg = small_lm(moe_every);
  const LmParams p = init_lm_params(cfg, DType::kF32, 7);
  const fs::path dir =
      fs::temp_directory_path() / fmt::format("sy_export_{}_{}", moe_every, ::getpid());
  fs::remove_all(dir);
  const auto notes = export_hf_model(cfg, p, dir.string());
  const HfModel m = load_hf_model(dir.string());
  EXPECT_EQ(m.model_type, moe_every ? "mixtral" : "llama");
  ASSERT_TRUE(m.tokenizer.has_value());
  EXPECT_EQ(m.tokenizer->encode("Emma, h\xc3\xa9"),
            (std::vector<int32_t>{'E', 'm', 'm', 'a', ',', ' ', 'h', 0xc3, 0xa9}));
  EXPECT_EQ(m.tokenizer->decode(std::vector<int32_t>{'h', 0xc3, 0xa9}), "h\xc3\xa9");

  const ExecContext ctx = f32_context();
  const LanguageModel ours(cfg);
  const DecoderModel theirs(m.config);
  const std::vector<int32_t> ids = {69,  109, 109, 97,  32,  87,  111,
                                    111, 100, 104, 111, 117, 115, 101};
  DecodeState s1 = ours.start(DType::kF32);
  DecoderState s2 = theirs.start();
  Tensor logits;
  for (size_t i = 0; i < ids.size(); ++i) {
    std::vector<float> a;
    ours.decode(p, std::span(ids).subspan(i, 1), s1, a, ctx);
    theirs.forward(m.params, std::span(ids).subspan(i, 1), s2, logits, ctx);
    ASSERT_EQ(int64_t(a.size()), logits.numel());
    for (size_t v = 0; v < a.size(); ++v)
      ASSERT_NEAR(a[v], logits.data<float>()[v], 1e-4) << "position " << i << " token " << v;
  }
  fs::remove_all(dir);
}

TEST(HfExport, MoeModelAsMixtralHasEqualLogits) { expect_export_round_trip(1); }
TEST(HfExport, DenseModelAsLlamaHasEqualLogits) { expect_export_round_trip(0); }

TEST(HfExport, RefusesWhatTransformersCannotExpress) {
  auto error = [](LmConfig c) {
    try {
      export_hf_model(c, init_lm_params(c, DType::kF32, 1),
                      (fs::temp_directory_path() / "sy_export_refused").string());
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("(exported)");
  };
  LmConfig c = small_lm(2);
  EXPECT_NE(error(c).find("model.moe_every = 2"), std::string::npos);
  c = small_lm(1);
  c.moe.gating = Gating::kExpertChoice;
  c.moe.dropless = false;
  EXPECT_NE(error(c).find("model.moe.router"), std::string::npos);
  c = small_lm(1);
  c.moe.renormalize = false;
  EXPECT_NE(error(c).find("model.moe.renormalize = false"), std::string::npos);
  EXPECT_FALSE(fs::exists(fs::temp_directory_path() / "sy_export_refused"));
}

}  // namespace
}  // namespace sy

namespace sy {
namespace {

// Switchyard -> mixtral / llama directory -> import_hf_lm (train --init-from): the shape fields
// and every tensor come back exactly; the run's other settings stay those of the base config.
void expect_import_round_trip(int64_t moe_every) {
  LmConfig cfg = small_lm(moe_every);
  cfg.rope_theta = 5e5;
  cfg.norm_eps = 1e-6;
  const LmParams p = init_lm_params(cfg, DType::kF32, 11);
  const fs::path dir =
      fs::temp_directory_path() / fmt::format("sy_import_{}_{}", moe_every, ::getpid());
  fs::remove_all(dir);
  export_hf_model(cfg, p, dir.string());
  LmConfig base;  // the defaults: other widths, heads, experts
  base.context = 48;
  base.moe.capacity_factor_train = 1.5;
  const ImportedLm imp = import_hf_lm(dir.string(), base);
  EXPECT_EQ(imp.cfg.d_model, cfg.d_model);
  EXPECT_EQ(imp.cfg.n_layers, cfg.n_layers);
  EXPECT_EQ(imp.cfg.n_heads, cfg.n_heads);
  EXPECT_EQ(imp.cfg.moe_every, cfg.moe_every);
  EXPECT_EQ(imp.cfg.rope_theta, cfg.rope_theta);
  EXPECT_EQ(imp.cfg.norm_eps, cfg.norm_eps);
  if (moe_every) {
    EXPECT_EQ(imp.cfg.moe.n_experts, cfg.moe.n_experts);
    EXPECT_EQ(imp.cfg.moe.top_k, cfg.moe.top_k);
    EXPECT_EQ(imp.cfg.moe.d_ff, cfg.moe.d_ff);
  } else {
    EXPECT_EQ(imp.cfg.d_ff, cfg.d_ff);
  }
  EXPECT_EQ(imp.cfg.context, 48);  // the run's, not the file's
  EXPECT_EQ(imp.cfg.moe.capacity_factor_train, 1.5);
  const auto want = p.named();
  const auto got = imp.params.named();
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].first, want[i].first);
    ASSERT_EQ(got[i].second->shape(), want[i].second->shape()) << got[i].first;
    const auto a = got[i].second->span<float>(), b = want[i].second->span<float>();
    for (size_t j = 0; j < a.size(); ++j)
      if (std::string_view(got[i].first).ends_with("expert_bias"))
        ASSERT_EQ(a[j], 0.0f);
      else
        ASSERT_EQ(a[j], b[j]) << got[i].first << "[" << j << "]";
  }
  fs::remove_all(dir);
}

TEST(HfImport, ExportedMixtralComesBackExactly) { expect_import_round_trip(1); }
TEST(HfImport, ExportedLlamaComesBackExactly) { expect_import_round_trip(0); }

TEST(HfImport, RefusesWhatSwitchyardsModelCannotHold) {
  auto error = [](const std::string& model) {
    try {
      import_hf_lm(fixture("models/" + model), LmConfig{});
    } catch (const ConfigError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(error("qwen3_moe").find("model_type (qwen3_moe)"), std::string::npos)
      << error("qwen3_moe");
  EXPECT_NE(error("mixtral").find("vocab_size (mixtral): 576 tokens"), std::string::npos)
      << error("mixtral");
  EXPECT_NE(error("llama").find("vocab_size (llama)"), std::string::npos) << error("llama");

  // An exported model whose config asks for linear RoPE scaling: the loader takes it, the
  // training model has no such option.
  const LmConfig cfg = small_lm(1);
  const fs::path dir = fs::temp_directory_path() / fmt::format("sy_import_gqa_{}", ::getpid());
  fs::remove_all(dir);
  export_hf_model(cfg, init_lm_params(cfg, DType::kF32, 3), dir.string());
  nlohmann::json j = nlohmann::json::parse(read((dir / "config.json").string()));
  j.erase("rope_scaling");
  j["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 2.0}, {"rope_theta", 10000.0}};
  write(dir / "config.json", j.dump());
  try {
    import_hf_lm(dir.string(), LmConfig{});
    ADD_FAILURE() << "linear RoPE scaling accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("rope_parameters (mixtral)"), std::string::npos)
        << e.what();
  }
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sy
