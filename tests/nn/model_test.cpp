// The transformer layers: float64 finite-difference checks of attention (with RoPE) and of the
// whole language model (dense and MoE layers, auxiliary losses included); KV-cached decoding
// against the full forward; the same numbers at any thread count; clear errors for bad input.
#include "switchyard/nn/model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "switchyard/nn/attention.h"
#include "testing/testing.h"

namespace sy {
namespace {

using testing::dot;
using testing::expect_grad_close;
using testing::random_tensor;

// Float64 finite differences of y . r for dx, dw_qkv and dw_o: two sequences of 5 positions.
void gradcheck_attention(const AttentionConfig& cfg, uint64_t seed) {
  Attention attn(cfg);
  const int64_t n_seq = 2, L = 5, T = n_seq * L, d = cfg.d_model;
  AttentionParams p = init_attention_params(cfg, DType::kF64, seed);
  AttentionParams g{Tensor(p.w_qkv.shape(), DType::kF64), Tensor(p.w_o.shape(), DType::kF64)};
  Tensor x = random_tensor({T, d}, DType::kF64, seed + 1),
         r = random_tensor({T, d}, DType::kF64, seed + 2);
  Tensor y, dx;
  AttentionCache cache;
  const ExecContext ctx;
  auto loss = [&] {
    attn.forward(p, x, n_seq, y, cache, ctx);
    return dot(y.span<double>(), r.span<double>());
  };
  loss();
  attn.backward(p, cache, r, g, dx, ctx);
  expect_grad_close(loss, x.span<double>(), dx.span<double>(), "dx");
  expect_grad_close(loss, p.w_qkv.span<double>(), g.w_qkv.span<double>(), "dw_qkv");
  expect_grad_close(loss, p.w_o.span<double>(), g.w_o.span<double>(), "dw_o");
}

TEST(AttentionGradcheck, InputAndWeights) {
  gradcheck_attention({.d_model = 8, .n_heads = 2, .max_context = 7, .rope_theta = 100}, 3);
}

// The vision encoder's attention: bidirectional, no RoPE. Gradients by finite differences in
// float64; every position sees every other one of its sequence (and none of the next); with no
// position information, permuting a sequence's rows permutes its outputs the same way.
TEST(AttentionGradcheck, BidirectionalWithoutRope) {
  const AttentionConfig cfg{
      .d_model = 12, .n_heads = 3, .max_context = 7, .causal = false, .rope = false};
  gradcheck_attention(cfg, 13);
  Attention attn(cfg);
  const int64_t n_seq = 2, L = 5, T = n_seq * L, d = 12;
  const AttentionParams p = init_attention_params(cfg, DType::kF64, 13);
  const Tensor x = random_tensor({T, d}, DType::kF64, 14);
  AttentionCache cache;
  const ExecContext ctx;
  Tensor y0, y1;
  attn.forward(p, x, n_seq, y0, cache, ctx);
  Tensor x1 = x.clone();
  for (int64_t j = 0; j < d; ++j) x1.data<double>()[4 * d + j] += 0.5;  // sequence 0, position 4
  attn.forward(p, x1, n_seq, y1, cache, ctx);
  for (int64_t t = 0; t < T; ++t) {
    double change = 0;
    for (int64_t j = 0; j < d; ++j)
      change += std::abs(y1.data<double>()[t * d + j] - y0.data<double>()[t * d + j]);
    if (t < L)
      EXPECT_GT(change, 1e-6) << "position " << t << " does not see position 4";
    else
      EXPECT_EQ(change, 0.0) << "sequence 1 saw sequence 0";
  }
  const int64_t perm[5] = {3, 0, 4, 1, 2};  // row t of sequence 0 takes row perm[t]
  Tensor xp = x.clone(), yp;
  for (int64_t t = 0; t < L; ++t)
    std::memcpy(xp.data<double>() + t * d, x.data<double>() + perm[t] * d, d * sizeof(double));
  attn.forward(p, xp, n_seq, yp, cache, ctx);
  for (int64_t t = 0; t < L; ++t)
    for (int64_t j = 0; j < d; ++j)
      EXPECT_NEAR(yp.data<double>()[t * d + j], y0.data<double>()[perm[t] * d + j], 1e-12);
  KvCache kv = attn.start(DType::kF64);
  Tensor one = random_tensor({1, d}, DType::kF64, 16), out;
  EXPECT_THROW(attn.decode(p, one, kv, out, ctx), ConfigError);
}

TEST(Attention, IsCausalAndSequencesAreIndependent) {
  const AttentionConfig cfg{.d_model = 8, .n_heads = 2, .max_context = 6};
  Attention attn(cfg);
  AttentionParams p = init_attention_params(cfg, DType::kF64, 6);
  Tensor x = random_tensor({12, 8}, DType::kF64, 7), y1, y2;
  AttentionCache cache;
  attn.forward(p, x, 2, y1, cache, {});
  // Changing position 4 of sequence 0 changes nothing before it and nothing in sequence 1.
  for (int64_t j = 0; j < 8; ++j) x.data<double>()[4 * 8 + j] += 0.5;
  attn.forward(p, x, 2, y2, cache, {});
  for (int64_t t = 0; t < 12; ++t)
    for (int64_t j = 0; j < 8; ++j) {
      const double a = y1.data<double>()[t * 8 + j], b = y2.data<double>()[t * 8 + j];
      if (t < 4 || t >= 6) {
        EXPECT_EQ(a, b) << "row " << t;
      }
    }
}

// Decode in chunks (one row, up to the direct limit of 16, and longer chunks on the GEMM path)
// equals the full forward, for head widths on the vector path (multiples of 16, with 1 to 5
// vectors) and off it, in f64 and f32.
TEST(Attention, DecodeBatchInChunksMatchesForward) {
  struct Shape {
    int64_t d, heads;
  };
  for (const Shape sh : {Shape{8, 2}, Shape{48, 1}, Shape{64, 2}, Shape{160, 2}, Shape{42, 3}})
    for (const DType dt : {DType::kF64, DType::kF32}) {
      const int64_t L = 37, S = 3;
      const AttentionConfig cfg{.d_model = sh.d, .n_heads = sh.heads, .max_context = 40};
      Attention attn(cfg);
      const AttentionParams p = init_attention_params(cfg, dt, 31);
      const Tensor x = random_tensor({S * L, sh.d}, dt, 32);
      Tensor want, got;
      AttentionCache cache;
      attn.forward(p, x, S, want, cache, {});
      // chunks[s]: the rows sequence s feeds, step after step (0: nothing that step).
      const std::vector<std::vector<int64_t>> chunks = {{1, 1, 1, 17, 1, 16},  // 37
                                                        {20, 0, 16, 1},        // 37
                                                        {16, 5, 0, 1, 15}};    // 37
      std::vector<KvCache> kv;
      for (int64_t s = 0; s < S; ++s) kv.push_back(attn.start(dt));
      std::vector<int64_t> fed(static_cast<size_t>(S), 0);
      for (size_t step = 0;; ++step) {
        std::vector<int64_t> starts = {0};
        std::vector<int64_t> rows;  // the forward rows fed this step
        std::vector<KvCache*> kvs;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t n = step < chunks[s].size() ? chunks[s][step] : 0;
          for (int64_t i = 0; i < n; ++i) rows.push_back(s * L + fed[s] + i);
          fed[s] += n;
          starts.push_back(int64_t(rows.size()));
          kvs.push_back(&kv[s]);
        }
        if (rows.empty()) break;
        Tensor xs({int64_t(rows.size()), sh.d}, dt);
        const size_t es = dtype_size(dt);
        for (size_t r = 0; r < rows.size(); ++r)
          std::memcpy(xs.bytes() + r * sh.d * es, x.bytes() + rows[r] * sh.d * es, sh.d * es);
        attn.decode_batch(p, xs, starts, kvs, got, {});
        const double tol = dt == DType::kF64 ? 1e-12 : 2e-5;
        for (size_t r = 0; r < rows.size(); ++r)
          for (int64_t j = 0; j < sh.d; ++j) {
            const double a = dt == DType::kF64 ? got.data<double>()[r * sh.d + j]
                                               : got.data<float>()[r * sh.d + j];
            const double b = dt == DType::kF64 ? want.data<double>()[rows[r] * sh.d + j]
                                               : want.data<float>()[rows[r] * sh.d + j];
            ASSERT_NEAR(a, b, tol * (1 + std::abs(b)))
                << "d " << sh.d << " heads " << sh.heads << " " << dtype_name(dt) << " step "
                << step << " forward row " << rows[r] << " column " << j;
          }
      }
      for (int64_t s = 0; s < S; ++s) EXPECT_EQ(kv[s].n_pos, L);
    }
}

LmConfig tiny_config(int64_t moe_every, bool dropless = false) {
  LmConfig cfg;
  cfg.vocab = 11;
  cfg.context = 6;
  cfg.d_model = 8;
  cfg.n_layers = 2;
  cfg.n_heads = 2;
  cfg.moe_every = moe_every;
  cfg.d_ff = 10;
  cfg.moe.n_experts = 4;
  cfg.moe.top_k = 2;
  cfg.moe.d_ff = 6;
  cfg.moe.capacity_factor_train = 1.0;  // some slots dropped
  cfg.moe.dropless = dropless;
  cfg.moe.loss_balance_weight = 0.1;
  cfg.moe.loss_z_weight = 0.01;
  return cfg;
}

void gradcheck_model(const LmConfig& cfg) {
  LanguageModel model(cfg);
  LmParams p = init_lm_params(cfg, DType::kF64, 11);
  LmParams g = zeros_like(p);
  const std::vector<int32_t> tokens = {1, 5, 7, 2, 9, 10, 0, 3, 3, 8};
  const std::vector<int32_t> targets = {5, 7, 2, 9, -1, 0, 3, 3, 8, 4};
  LmCache cache;
  const ExecContext ctx;
  auto loss = [&] {
    LmStep s = model.forward(p, tokens, targets, 2, cache, ctx);
    return s.loss + s.aux;
  };
  loss();
  model.backward(p, cache, g, ctx);
  testing::expect_named_grads_close(loss, p.named(), g.named());
}

TEST(LanguageModelGradcheck, MoeAndDenseLayers) { gradcheck_model(tiny_config(2)); }
TEST(LanguageModelGradcheck, AllDense) { gradcheck_model(tiny_config(0)); }
TEST(LanguageModelGradcheck, AllMoeWithSharedExpert) {
  LmConfig cfg = tiny_config(1);
  cfg.moe.n_shared_experts = 1;
  gradcheck_model(cfg);
}

TEST(LanguageModel, DecodeWithKvCacheMatchesFullForward) {
  const LmConfig cfg = tiny_config(1, /*dropless=*/true);
  LanguageModel model(cfg);
  const LmParams p = init_lm_params(cfg, DType::kF32, 12);
  const std::vector<int32_t> tokens = {4, 1, 9, 9, 2, 7};
  LmCache cache;
  ExecContext eval;
  eval.training = false;
  for (int64_t n = 1; n <= 6; ++n) {
    std::span<const int32_t> prefix(tokens.data(), size_t(n));
    const std::vector<int32_t> no_targets(size_t(n), -1);
    model.forward(p, prefix, no_targets, 1, cache, eval);
    // Prefill all but the last token, then one step.
    DecodeState state = model.start(DType::kF32);
    std::vector<float> logits;
    if (n > 1) model.decode(p, prefix.first(size_t(n - 1)), state, logits, eval);
    model.decode(p, prefix.last(1), state, logits, eval);
    ASSERT_EQ(state.n_pos(), n);
    for (int64_t v = 0; v < cfg.vocab; ++v)
      EXPECT_NEAR(logits[v], cache.logits.data<float>()[(n - 1) * cfg.vocab + v], 1e-4)
          << "prefix " << n << " logit " << v;
  }
}

TEST(LanguageModel, DecodeBatchEqualsEachSequenceAlone) {
  // Five sequences of odd, unequal prompts prefilled together, then steps mixing one-token
  // decodes with a chunk of prefill: each sequence's logits are what it gets decoded alone.
  LmConfig cfg = tiny_config(1, /*dropless=*/true);
  cfg.context = 24;
  LanguageModel model(cfg);
  const LmParams p = init_lm_params(cfg, DType::kF32, 21);
  ExecContext eval;
  eval.training = false;
  const int64_t S = 5;
  // steps[t][s]: the tokens sequence s feeds at step t.
  std::vector<std::vector<std::vector<int32_t>>> steps = {
      {{3, 1, 4}, {1}, {5, 9, 2, 6, 5, 3, 5}, {8, 9}, {7, 9, 3, 2, 3}},
      {{8}, {4}, {6}, {2, 6, 4}, {3}},
      {{3}, {8, 3, 2, 7, 9}, {5}, {0}, {2}},
  };
  std::vector<DecodeState> batched(static_cast<size_t>(S)), alone(static_cast<size_t>(S));
  for (size_t t = 0; t < steps.size(); ++t) {
    std::vector<std::span<const int32_t>> tokens;
    std::vector<DecodeState*> states;
    for (int64_t s = 0; s < S; ++s) {
      tokens.emplace_back(steps[t][s]);
      states.push_back(&batched[s]);
    }
    Tensor logits;
    DecodeRouting routing;
    model.decode_batch(p, tokens, states, logits, eval, &routing);
    ASSERT_EQ(logits.dim(0), S);
    size_t rows = 0;
    for (const auto& seq : steps[t]) rows += seq.size();
    ASSERT_EQ(int64_t(routing.top1.size()), cfg.n_moe_layers());
    for (size_t l = 0; l < routing.top1.size(); ++l) {
      EXPECT_EQ(routing.top1[l].size(), rows);
      EXPECT_EQ(routing.layers[l].capacity, -1);  // dropless
    }
    for (int64_t s = 0; s < S; ++s) {
      std::vector<float> want;
      model.decode(p, steps[t][s], alone[s], want, eval);
      EXPECT_EQ(batched[s].n_pos(), alone[s].n_pos());
      for (int64_t v = 0; v < cfg.vocab; ++v)
        EXPECT_NEAR(logits.data<float>()[s * cfg.vocab + v], want[v], 1e-5)
            << "step " << t << " sequence " << s << " logit " << v;
    }
  }
  // A sequence that would pass the context: refused before any cache moves.
  const std::vector<int32_t> one = {1}, too_long(20, 2);
  const std::span<const int32_t> tokens[2] = {one, too_long};
  DecodeState* const states[2] = {&batched[0], &batched[2]};
  const int64_t before0 = batched[0].n_pos(), before2 = batched[2].n_pos();
  Tensor logits;
  try {
    model.decode_batch(p, tokens, states, logits, eval);
    FAIL() << "a sequence past the context was accepted";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("exceed the context of 24"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(batched[0].n_pos(), before0);
  EXPECT_EQ(batched[2].n_pos(), before2);
}

// bf16_expert_params: decoding reads the experts as bf16, exactly as f32 weights holding the
// same rounded values would give; training and the full forward refuse them by name.
TEST(LanguageModel, Bf16ExpertsDecodeAsTheirRoundedValues) {
  LmConfig cfg = tiny_config(2, /*dropless=*/true);  // layer 0 dense, layer 1 MoE
  cfg.context = 24;
  cfg.d_model = 20;
  cfg.moe.d_ff = 19;
  LanguageModel model(cfg);
  const LmParams p = init_lm_params(cfg, DType::kF32, 41);
  const LmParams half = bf16_expert_params(p);
  LmParams rounded = bf16_expert_params(p);
  for (LayerParams& l : rounded.layers)
    for (Tensor* w : {&l.moe.w1, &l.moe.w3, &l.moe.w2})
      if (!w->empty()) *w = convert(*w, DType::kF32);
  EXPECT_EQ(half.layers[1].moe.w1.dtype(), DType::kBF16);
  EXPECT_EQ(half.layers[1].moe.w_gate.dtype(), DType::kF32);
  EXPECT_EQ(half.layers[0].w1.dtype(), DType::kF32);  // dense layers stay f32
  ExecContext eval;
  eval.training = false;
  const std::vector<std::vector<int32_t>> seqs = {{3, 1, 4, 1, 5}, {9}, {2, 6, 5, 3, 5, 8, 9, 7}};
  std::vector<DecodeState> a(seqs.size()), b(seqs.size());
  std::vector<std::span<const int32_t>> tokens(seqs.begin(), seqs.end());
  std::vector<DecodeState*> pa, pb;
  for (size_t s = 0; s < seqs.size(); ++s) {
    pa.push_back(&a[s]);
    pb.push_back(&b[s]);
  }
  Tensor la, lb;
  for (int step = 0; step < 3; ++step) {
    model.decode_batch(half, tokens, pa, la, eval);
    model.decode_batch(rounded, tokens, pb, lb, eval);
    for (int64_t i = 0; i < la.numel(); ++i)
      ASSERT_EQ(la.data<float>()[i], lb.data<float>()[i]) << "step " << step << " logit " << i;
  }
  // Somewhat different from the f32 experts: the rounding is real.
  std::vector<DecodeState> c(1);
  DecodeState* pc[1] = {&c[0]};
  Tensor lc, lh;
  const std::span<const int32_t> one[1] = {seqs[2]};
  model.decode_batch(p, one, pc, lc, eval);
  c[0] = DecodeState{};
  model.decode_batch(half, one, pc, lh, eval);
  double diff = 0;
  for (int64_t i = 0; i < lc.numel(); ++i)
    diff = std::max(diff, double(std::abs(lc.data<float>()[i] - lh.data<float>()[i])));
  EXPECT_GT(diff, 0.0);
  EXPECT_LT(diff, 0.05);
  LmCache cache;
  const std::vector<int32_t> toks = {1, 2, 3, 4}, targets = {2, 3, 4, 5};
  try {
    model.forward(half, toks, targets, 1, cache, eval);
    FAIL() << "forward took bf16 experts";
  } catch (const ShapeError& e) {
    EXPECT_NE(std::string(e.what()).find("layers.1.moe.w1 is bf16"), std::string::npos) << e.what();
  }
}

// Every backend (f32 and bf16 compute, each library): the bits never depend on the thread count.
class ModelOnBackend : public ::testing::TestWithParam<const Backend*> {};

TEST_P(ModelOnBackend, SameLossAndGradientsAtAnyThreadCount) {
  LmConfig cfg = tiny_config(1);
  cfg.context = 40;
  cfg.d_model = 32;
  cfg.moe.d_ff = 48;
  LanguageModel model(cfg);
  const LmParams p = init_lm_params(cfg, DType::kF32, 13);
  std::vector<int32_t> tokens(160), targets(160);
  for (size_t i = 0; i < tokens.size(); ++i) {
    tokens[i] = int32_t((i * 7 + 3) % 11);
    targets[i] = int32_t((i * 5 + 1) % 11);
  }
  std::vector<double> losses;
  std::vector<std::vector<float>> grads;
  for (int threads : {1, 2, 3}) {
    ExecContext ctx;
    ctx.n_threads = threads;
    ctx.backend = GetParam();
    LmParams g = zeros_like(p);
    LmCache cache;
    losses.push_back(model.forward(p, tokens, targets, 4, cache, ctx).loss);
    model.backward(p, cache, g, ctx);
    std::vector<float> flat;
    for (auto& [name, t] : g.named())
      flat.insert(flat.end(), t->span<float>().begin(), t->span<float>().end());
    grads.push_back(std::move(flat));
  }
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_EQ(losses[0], losses[2]);
  EXPECT_EQ(grads[0], grads[1]);
  EXPECT_EQ(grads[0], grads[2]);
}

INSTANTIATE_TEST_SUITE_P(
    Available, ModelOnBackend,
    ::testing::ValuesIn(std::vector<const Backend*>(available_backends(cpu_features()).begin(),
                                                    available_backends(cpu_features()).end())),
    [](const ::testing::TestParamInfo<const Backend*>& info) {
      std::string s = info.param->name;
      for (char& ch : s)
        if (ch == '-') ch = '_';
      return s;
    });

TEST(LanguageModel, BadInputNamesWhatWasExpected) {
  LmConfig cfg = tiny_config(1);
  LanguageModel model(cfg);
  LmParams p = init_lm_params(cfg, DType::kF32, 14);
  LmCache cache;
  const std::vector<int32_t> bad_token = {1, 11}, ok = {1, 2};
  EXPECT_THROW(
      {
        try {
          model.forward(p, bad_token, ok, 1, cache, {});
        } catch (const ShapeError& e) {
          EXPECT_NE(std::string(e.what()).find("expected 0..10 (model.vocab)"), std::string::npos);
          throw;
        }
      },
      ShapeError);
  const std::vector<int32_t> long_seq(7, 1);
  EXPECT_THROW(model.forward(p, long_seq, long_seq, 1, cache, {}), ShapeError);  // > context
  p.layers[1].attn.w_o = Tensor({8, 9}, DType::kF32);
  EXPECT_THROW(model.forward(p, ok, ok, 1, cache, {}), ShapeError);
  cfg.n_heads = 3;
  EXPECT_THROW(LanguageModel{cfg}, ConfigError);
}

}  // namespace
}  // namespace sy
