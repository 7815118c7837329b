// Routes of published decoders (analyze_decoder_routes, `routes --model`): every slot of every
// token counted once, nothing dropped, co-selection consistent with the slots, labels that
// account for every slot, on fixtures with softmax and sigmoid routers.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "io/fixtures.h"
#include "switchyard/io/hf_model.h"
#include "switchyard/kernels/backend.h"
#include "switchyard/train/routes.h"

namespace sy {
namespace {

class HfRoutes : public ::testing::TestWithParam<std::string> {};

TEST_P(HfRoutes, EverySlotCountedOnceAndLabelled) {
  const HfModel m = load_hf_model(testing::fixture("models/" + GetParam()));
  ASSERT_TRUE(m.tokenizer.has_value());
  const DecoderModel model(m.config);
  ExecContext ctx;
  ctx.backend = &pick_backend(cpu_features(), Precision::kF32);
  const std::string text =
      "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy "
      "disposition, seemed to unite some of the best blessings of existence; 1816, \"Mr. "
      "Knightley\" -- and had lived nearly twenty-one years in the world.\n";
  std::vector<int32_t> ids;
  for (int i = 0; i < 3; ++i) {
    const std::vector<int32_t> part = m.tokenizer->encode(text, false);
    ids.insert(ids.end(), part.begin(), part.end());
  }
  // A window that does not divide the text: the last one is short.
  const RouteAnalysis a = analyze_decoder_routes(model, m.params, *m.tokenizer, ids, 37, ctx);
  const int64_t E = m.config.moe.n_experts, k = m.config.moe.slots_per_token();
  EXPECT_EQ(a.n_tokens, int64_t(ids.size()));
  ASSERT_EQ(int64_t(a.layers.size()), m.config.n_moe_layers());
  for (const LayerRoutes& lr : a.layers) {
    EXPECT_TRUE(m.config.moe_layer[size_t(lr.layer)]) << lr.layer;
    int64_t slots = 0;
    for (int64_t e = 0; e < E; ++e) {
      const ExpertProfile& ep = lr.experts[size_t(e)];
      EXPECT_EQ(ep.kept, ep.slots) << "layer " << lr.layer << " expert " << e;
      slots += ep.slots;
      // Each token that chose e chose k - 1 others with it.
      const int64_t with = std::accumulate(lr.co_selected[size_t(e)].begin(),
                                           lr.co_selected[size_t(e)].end(), int64_t(0));
      EXPECT_EQ(with, ep.slots * (k - 1)) << "layer " << lr.layer << " expert " << e;
      EXPECT_EQ(lr.co_selected[size_t(e)][size_t(e)], 0);
      for (int64_t f = 0; f < E; ++f)
        EXPECT_EQ(lr.co_selected[size_t(e)][size_t(f)], lr.co_selected[size_t(f)][size_t(e)]);
      for (const auto& [word, lift] : ep.top_words) {
        EXPECT_FALSE(word.empty());
        EXPECT_GT(lift, 0.0);
      }
      EXPECT_TRUE(ep.top_bytes.empty()) << "tokens are not bytes";
    }
    EXPECT_EQ(slots, a.n_tokens * k) << "layer " << lr.layer;
    EXPECT_EQ(lr.dropped_fraction, 0.0);
    EXPECT_GT(lr.entropy, 0.0);
    EXPECT_LE(lr.entropy, std::log(double(E)) + 1e-9);
    ASSERT_EQ(lr.labels.size(), 1u);  // character class only: no labelled corpus
    double labelled = 0;
    for (const auto& row : lr.labels[0].slots) labelled += std::accumulate(row.begin(), row.end(), 0.0);
    EXPECT_EQ(labelled, double(slots));
  }
  const std::string shown = render_routes_text(a);
  EXPECT_NE(shown.find("router entropy"), std::string::npos);
  EXPECT_NE(render_routes_html(a, GetParam()).find("<h2>Layer"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Routers, HfRoutes,
                         ::testing::Values("mixtral", "qwen3_moe", "deepseek_v3"),
                         [](const auto& info) { return info.param; });

TEST(HfRoutes, DenseModelHasNone) {
  const HfModel m = load_hf_model(testing::fixture("models/llama"));
  const DecoderModel model(m.config);
  const std::vector<int32_t> ids = {1, 2, 3};
  EXPECT_THROW(analyze_decoder_routes(model, m.params, *m.tokenizer, ids, 8, {}), ConfigError);
}

}  // namespace
}  // namespace sy
